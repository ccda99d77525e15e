"""Profiles, weights, the CLIP embedder and tiny YOLO-World: offline, on the ``tiny`` models."""

from __future__ import annotations

import copy
import hashlib
import io
import os
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import weights
from engine.errors import MissingWeightError
from engine.models import Models, build_detector, load_models
from engine.profiles import PROFILES, parse_detector_spec, resolve_profile
from engine.settings import EngineSettings

REPO_ROOT = Path(__file__).resolve().parent.parent

# Subjects whose first two photos serve as "different photos" (same and different subject).
SUBJECTS = ("cat", "dog", "backpack", "teapot", "clock", "vase", "berry_bowl", "robot_toy")


@pytest.fixture(scope="session")
def tiny_settings(tiny_models: tuple[EngineSettings, Models]) -> EngineSettings:
    return tiny_models[0]


@pytest.fixture(scope="session")
def tiny(tiny_models: tuple[EngineSettings, Models]) -> Models:
    """The tiny models (conftest builds them once per test session)."""
    return tiny_models[1]


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test instead of hanging it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _photo(dreambooth: Path, subject: str, index: int = 0) -> Image.Image:
    with Image.open(dreambooth / subject / f"{index:02d}.jpg") as im:
        return im.convert("RGB")


def _jpeg(image: Image.Image, quality: int = 85) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


# --- profiles ------------------------------------------------------------------------------


def test_profiles_have_their_architectures() -> None:
    assert (
        PROFILES["gpu"].clip_model == "ViT-L-14-336" and PROFILES["gpu"].clip_pretrained == "openai"
    )
    assert PROFILES["cpu"].clip_model == "ViT-B-32" and PROFILES["cpu"].clip_pretrained == "openai"
    for profile in PROFILES.values():
        assert profile.detector_kind == "yolo-world"
        assert 0 < profile.match_threshold <= 1
    # YOLO-World's text tower is the OpenAI ViT-B/32 it was trained with, shared on cpu.
    cpu = PROFILES["cpu"]
    assert (cpu.detector_text_model, cpu.detector_text_pretrained) == (
        cpu.clip_model,
        cpu.clip_pretrained,
    )


def test_profile_overrides_from_settings() -> None:
    settings = EngineSettings(
        profile="cpu",
        clip_model="ViT-B-16",
        clip_pretrained="/models/clip.safetensors",
        detector="/models/coco.tflite",
        detector_text_weights="/models/vit-b-32.safetensors",
        match_threshold=0.7,
        detector_image_size=480,
    )
    profile = resolve_profile(settings)
    assert profile.clip_model == "ViT-B-16"
    assert profile.clip_pretrained == "/models/clip.safetensors"
    assert profile.detector_kind == "yolo"
    assert profile.detector_text_pretrained == "/models/vit-b-32.safetensors"
    assert profile.match_threshold == 0.7
    assert profile.detector_image_size == 480
    # Unset values keep the profile's own.
    plain = resolve_profile(EngineSettings(profile="tiny"))
    assert plain.detector_image_size == PROFILES["tiny"].detector_image_size
    assert plain.match_threshold == PROFILES["tiny"].match_threshold


def test_random_weights_swap_downloads_for_architectures() -> None:
    profile = resolve_profile(EngineSettings(profile="cpu", random_weights=True))
    assert profile.clip_pretrained == "" and profile.detector_text_pretrained == ""
    assert profile.detector == "yolo-world:yolov8s-worldv2.yaml"
    assert profile.match_threshold == profile.random_match_threshold
    # An explicit threshold still wins.
    assert (
        resolve_profile(
            EngineSettings(profile="cpu", random_weights=True, match_threshold=0.5)
        ).match_threshold
        == 0.5
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("none", ("none", "")),
        ("yolo-world:yolov8s-worldv2.pt", ("yolo-world", "yolov8s-worldv2.pt")),
        ("yolo:/m/coco.tflite", ("yolo", "/m/coco.tflite")),
        ("/m/yolov8x-worldv2.pt", ("yolo-world", "/m/yolov8x-worldv2.pt")),
        ("/m/coco.onnx", ("yolo", "/m/coco.onnx")),
    ],
)
def test_detector_specs(spec: str, expected: tuple[str, str]) -> None:
    assert parse_detector_spec(spec) == expected


# --- weights -------------------------------------------------------------------------------


def test_missing_local_weight_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "yolov8s-worldv2.pt"
    settings = EngineSettings(data_dir=tmp_path)
    with pytest.raises(MissingWeightError) as info:
        weights.detector_weight(str(missing), settings)
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(MissingWeightError, match="clip.bin"):
        weights.clip_checkpoint(
            "ViT-B-32", str(tmp_path / "clip.bin"), settings, "RAPBOT_CLIP_PRETRAINED"
        )


def test_offline_uncached_detector_is_one_fast_line(tmp_path: Path, no_network: None) -> None:
    settings = EngineSettings(data_dir=tmp_path, offline=True)
    start = time.monotonic()
    with pytest.raises(MissingWeightError) as info:
        weights.detector_weight("yolov8s-worldv2.pt", settings)
    assert time.monotonic() - start < 2
    message = str(info.value)
    assert "\n" not in message
    assert "'yolov8s-worldv2.pt'" in message and "offline" in message
    assert "https://github.com/ultralytics/assets/releases/download/" in message
    assert "RAPBOT_DETECTOR=" in message and str(tmp_path / "models") in message


def test_offline_is_implied_by_hub_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HF_HUB_OFFLINE", "YOLO_OFFLINE"):
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("YOLO_OFFLINE", raising=False)
        monkeypatch.setenv(name, "1")
        assert weights.is_offline(EngineSettings(data_dir=tmp_path, offline=False))
    monkeypatch.delenv("YOLO_OFFLINE")
    assert not weights.is_offline(EngineSettings(data_dir=tmp_path, offline=False))


def test_cached_detector_weight_is_used(tmp_path: Path, no_network: None) -> None:
    cached = tmp_path / "models" / "yolov8s-worldv2.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert (
        weights.detector_weight(
            "yolov8s-worldv2.pt", EngineSettings(data_dir=tmp_path, offline=True)
        )
        == cached
    )


def test_unknown_detector_name(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightError, match="'mystery.pt'"):
        weights.detector_weight("mystery.pt", EngineSettings(data_dir=tmp_path))


def test_offline_uncached_clip_tag_is_one_fast_line(tmp_path: Path, no_network: None) -> None:
    # Imported before timing: loading torch and the hub client is slow but is no hang.
    import open_clip  # noqa: F401
    from huggingface_hub import hf_hub_download  # noqa: F401

    settings = EngineSettings(data_dir=tmp_path, offline=True)
    start = time.monotonic()
    with pytest.raises(MissingWeightError) as info:
        weights.clip_checkpoint("ViT-B-32", "openai", settings, "RAPBOT_CLIP_PRETRAINED")
    assert time.monotonic() - start < 2
    message = str(info.value)
    assert "\n" not in message
    assert "https://huggingface.co/timm/vit_base_patch32_clip_224.openai" in message
    assert "RAPBOT_CLIP_PRETRAINED=" in message


def test_unknown_clip_tag(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightError, match="no weights 'bogus' for ViT-B-32"):
        weights.clip_checkpoint(
            "ViT-B-32", "bogus", EngineSettings(data_dir=tmp_path), "RAPBOT_CLIP_PRETRAINED"
        )


def test_network_failure_becomes_missing_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HF_HUB_OFFLINE", "YOLO_OFFLINE"):
        monkeypatch.delenv(name, raising=False)

    def unreachable(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(weights.urllib.request, "urlopen", unreachable)
    settings = EngineSettings(data_dir=tmp_path, offline=False)
    with pytest.raises(MissingWeightError) as info:
        weights.detector_weight("yolov8s-worldv2.pt", settings)
    assert "Name or service not known" in str(info.value) and "\n" not in str(info.value)
    assert not list((tmp_path / "models").glob("*")), "no partial file is left behind"


def test_download_is_atomic_and_cached(tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(3000))
    dest = tmp_path / "models" / "copy.bin"
    assert weights.download(source.as_uri(), dest, how="-") == dest
    assert dest.read_bytes() == source.read_bytes()
    # No partial file is left; the checksum of what was downloaded is recorded beside it.
    assert sorted(p.name for p in dest.parent.iterdir()) == ["SHA256SUMS", "copy.bin"]


def test_load_models_with_missing_detector_is_one_line(
    tiny_settings: EngineSettings, no_network: None
) -> None:
    settings = tiny_settings.model_copy(update={"detector": "yolov8s-worldv2.pt", "offline": True})
    with pytest.raises(MissingWeightError) as info:
        load_models(settings, reuse=False)
    assert "yolov8s-worldv2.pt" in str(info.value) and "\n" not in str(info.value)


# --- tiny embedder -------------------------------------------------------------------------


def test_tiny_builds_offline(tiny: Models, tiny_settings: EngineSettings) -> None:
    assert tiny.embedder.model_id == "open_clip:rapbot-tiny:seed0"
    assert tiny.embedder.dim == 512
    assert tiny.text_encoder is tiny.embedder, "YOLO-World's text tower is shared, not loaded twice"
    assert tiny.detector.name == "yolo-world:yolov8n-worldv2.yaml"
    assert tiny.match_threshold == PROFILES["tiny"].match_threshold
    assert load_models(tiny_settings) is tiny, "loaded once per configuration"


def test_embeddings_are_unit_rows_and_batching_does_not_matter(
    tiny: Models, dreambooth: Path
) -> None:
    images = [_photo(dreambooth, s) for s in SUBJECTS[:5]] + [Image.new("L", (40, 90), 200)]
    batched = tiny.embedder.embed_images(images)
    assert batched.shape == (6, 512) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([tiny.embedder.embed_images([im]) for im in images])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)

    texts = tiny.embedder.embed_texts(["a grey cat", "Mochi", "a red backpack"])
    assert texts.shape == (3, 512) and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert tiny.embedder.embed_images([]).shape == (0, 512)
    assert tiny.embedder.embed_texts([]).shape == (0, 512)


def test_batch_size_setting_is_used(
    tiny: Models, tiny_settings: EngineSettings, dreambooth: Path
) -> None:
    assert tiny.embedder.batch_size == tiny_settings.embed_batch_size
    small = copy.copy(tiny.embedder)
    small.batch_size = 2
    images = [_photo(dreambooth, s) for s in SUBJECTS[:5]]
    np.testing.assert_allclose(
        small.embed_images(images), tiny.embedder.embed_images(images), atol=1e-5
    )
    texts = ["cat", "dog", "a red backpack", "Mochi", "teapot"]
    np.testing.assert_allclose(
        small.embed_texts(texts), tiny.embedder.embed_texts(texts), atol=1e-5
    )


def test_identical_pixels_match_and_different_photos_do_not(tiny: Models, dreambooth: Path) -> None:
    threshold = tiny.match_threshold
    photos = [_photo(dreambooth, s, i) for s in SUBJECTS for i in (0, 1)]
    vectors = tiny.embedder.embed_images(photos)
    again = tiny.embedder.embed_images(photos[:4])
    np.testing.assert_allclose((vectors[:4] * again).sum(axis=1), 1.0, atol=1e-5)
    recoded = tiny.embedder.embed_images([_jpeg(p) for p in photos[:4]])
    assert ((vectors[:4] * recoded).sum(axis=1) >= threshold).all(), (
        "a JPEG re-encode is still the same photo"
    )
    similarity = vectors @ vectors.T
    off_diagonal = similarity[~np.eye(len(photos), dtype=bool)]
    assert off_diagonal.max() < threshold
    assert off_diagonal.mean() < 0.6, "random embeddings must not collapse onto one direction"


def _tiny_digest() -> str:
    """Hash of tiny embeddings and tiny YOLO-World boxes for fixed inputs (also run in a subprocess)."""
    import tempfile

    from engine.embedder import load_clip

    settings = EngineSettings(
        profile="tiny",
        data_dir=Path(tempfile.gettempdir()),
        device="cpu",
        detector_confidence=0.0,
        max_detections=5,
    )
    embedder = load_clip("rapbot-tiny", "", settings)
    pixels = np.random.default_rng(7).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    vectors = embedder.embed_images([image]).tobytes() + embedder.embed_texts(["Mochi"]).tobytes()
    detector = build_detector(resolve_profile(settings), settings, embedder)
    boxes = repr(detector.detect([image], ["cat", "dog"])).encode()
    return hashlib.sha256(vectors + boxes).hexdigest()


def test_tiny_is_deterministic_across_builds_and_processes(tiny_settings: EngineSettings) -> None:
    first = _tiny_digest()
    assert _tiny_digest() == first
    code = "import sys; sys.path.insert(0, sys.argv[1]); from tests.test_models import _tiny_digest; print(_tiny_digest())"
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "123"},
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == first


def test_fp16_path_matches_fp32(
    tiny: Models, tiny_settings: EngineSettings, dreambooth: Path
) -> None:
    """What CUDA runs (fp16 CLIP and YOLO-World), checked on the CPU."""
    import torch

    from engine.detector import YoloWorldDetector
    from engine.embedder import load_clip

    half = load_clip("rapbot-tiny", "", tiny_settings, precision="fp16")
    photo = _photo(dreambooth, "cat")
    assert float(half.embed_images([photo])[0] @ tiny.embedder.embed_images([photo])[0]) > 0.999
    assert half.embed_images([photo]).dtype == np.float32
    detector = tiny.detector
    assert isinstance(detector, YoloWorldDetector)
    world = YoloWorldDetector(
        copy.deepcopy(detector.model),
        half.encode_text_for_yolo,
        name="half",
        device=torch.device("cpu"),
        confidence=0.0,
        image_size=160,
        max_detections=3,
        half=True,
    )
    found = world.detect([photo], ["cat", "dog"])
    assert len(found) == 1 and {d.label for d in found[0]} <= {"cat", "dog"}


# --- tiny YOLO-World -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_world_all(tiny: Models, tiny_settings: EngineSettings):
    """Tiny YOLO-World keeping every box (random weights score ~5e-5), to see the labels."""
    settings = tiny_settings.model_copy(update={"detector_confidence": 0.0, "max_detections": 5})
    return build_detector(resolve_profile(settings), settings, tiny.text_encoder)


def test_tiny_world_uses_our_text_tower_offline(
    tiny: Models,
    tiny_world_all,
    dreambooth: Path,
    no_network: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ultralytics.nn.tasks import WorldModel

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("ultralytics tried to build its own CLIP text model")

    # WorldModel.set_classes -> get_text_pe -> build_text_model("clip:ViT-B/32") downloads.
    monkeypatch.setattr(WorldModel, "get_text_pe", forbidden)
    images = [
        _photo(dreambooth, "cat"),
        _photo(dreambooth, "dog"),
        Image.new("RGB", (300, 120), "white"),
    ]

    found = tiny_world_all.detect(images, ["cat", "dog", "Mochi"])
    assert len(found) == 3
    assert found[0] and found[1], "with confidence 0 a random model keeps boxes"
    for image, detections in zip(images, found, strict=True):
        assert len(detections) <= 5
        assert {d.label for d in detections} <= {"cat", "dog", "Mochi"}
        scores = [d.score for d in detections]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        for d in detections:
            assert (
                0 <= d.box.x1 < d.box.x2 <= image.width and 0 <= d.box.y1 < d.box.y2 <= image.height
            )
    expected = tiny.text_encoder.encode_text_for_yolo(["cat", "dog", "Mochi"])
    np.testing.assert_allclose(
        tiny_world_all.model.txt_feats[0].numpy(), expected.numpy(), atol=1e-6
    )
    assert tiny_world_all.model.model[-1].nc == 3

    # A new vocabulary (another chat) works, and a repeated one costs no text encoding.
    again = tiny_world_all.detect(images[:1], ["robot", "teapot"])
    assert {d.label for d in again[0]} <= {"robot", "teapot"} and tiny_world_all.model.model[
        -1
    ].nc == 2
    cached = tiny_world_all.text_features(("cat", "dog", "Mochi"))
    assert tiny_world_all.text_features(("cat", "dog", "Mochi")) is cached
    assert tiny_world_all.detect(images[:1], ["cat", "dog", "Mochi"]) == found[:1]
    assert "ultralytics.nn.text_model" not in sys.modules


def test_tiny_world_default_confidence_and_empty_inputs(tiny: Models, dreambooth: Path) -> None:
    found = tiny.detector.detect([_photo(dreambooth, "cat")], [])  # empty vocabulary = general one
    assert isinstance(found, list) and len(found) == 1 and isinstance(found[0], list)
    assert all(d.score >= 0.25 for d in found[0])
    assert tiny.detector.detect([], ["cat"]) == []
