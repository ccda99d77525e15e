"""Build the models of a profile once: the CLIP embedder, YOLO-World's text tower, the detector.

``load_models(settings)`` is the one entry point; it is memoised per settings so the engine,
workers and tests share one set of loaded models per configuration.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from engine.batching import BatchingDetector, BatchingEmbedder, detector_batch_limit
from engine.detector import Detector, NullDetector, YoloDetector, YoloWorldDetector
from engine.embedder import ClipEmbedder, load_clip, resolve_device, seeded
from engine.errors import MissingWeightError, RapbotError
from engine.generator.load import load_generator
from engine.profiles import Profile, parse_detector_spec, resolve_profile
from engine.retriever import RAP_DETECTOR_CONFIDENCE, retrieval_policy
from engine.settings import EngineSettings
from engine.weights import detector_weight, first_line, is_offline, looks_like_path

if TYPE_CHECKING:
    from engine.generator.hf import Generator

log = logging.getLogger(__name__)

_cache: dict[str, Models] = {}
_cache_lock = threading.Lock()
_owns_yolo_config = False  # True when we chose YOLO_CONFIG_DIR (inside the data folder)


@dataclass
class Models:
    profile: Profile
    embedder: ClipEmbedder
    detector: Detector
    match_threshold: float
    text_encoder: ClipEmbedder | None = None  # YOLO-World's vocabulary tower (may be ``embedder``)
    load_seconds: float = 0.0
    generator: Generator | None = None  # the multimodal LLM; None = recognition-only answers


def prepare_environment(settings: EngineSettings) -> None:
    """Safe defaults before ultralytics / huggingface_hub are imported (they read env at import).

    Offline also stops ultralytics' import-time DNS "is online" probe; its config folder goes
    into the data folder unless ``YOLO_CONFIG_DIR`` is set.
    """
    # ultralytics pip-installs missing packages at run time unless told not to: a service
    # must never change its own environment while serving.
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    # ultralytics prints banners to stdout, which would corrupt `rapbot --json` output.
    os.environ.setdefault("YOLO_VERBOSE", "false")
    if is_offline(settings):
        os.environ.setdefault("YOLO_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    global _owns_yolo_config
    if "YOLO_CONFIG_DIR" not in os.environ:
        folder = Path(settings.data_dir).expanduser() / "ultralytics"
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["YOLO_CONFIG_DIR"] = str(folder)
        _owns_yolo_config = True


def _import_ultralytics() -> None:
    from ultralytics.utils import SETTINGS

    # No usage analytics from a chat bot; only in our own config folder, never the user's.
    if _owns_yolo_config and SETTINGS.get("sync"):
        SETTINGS.update(sync=False)


def build_embedder(profile: Profile, settings: EngineSettings) -> ClipEmbedder:
    return load_clip(profile.clip_model, profile.clip_pretrained, settings, seed=profile.seed)


def build_text_encoder(
    profile: Profile, settings: EngineSettings, embedder: ClipEmbedder
) -> ClipEmbedder:
    """YOLO-World's text tower: the embedder itself when it is the same model (never load twice)."""
    if (profile.detector_text_model, profile.detector_text_pretrained) == (
        profile.clip_model,
        profile.clip_pretrained,
    ):
        return embedder
    pretrained = profile.detector_text_pretrained
    encoder = load_clip(
        profile.detector_text_model,
        pretrained,
        settings,
        seed=profile.seed,
        setting="RAPBOT_DETECTOR_TEXT_WEIGHTS",
        # A file here is OpenAI's ViT-B/32 (what YOLO-World was trained with): QuickGELU.
        quick_gelu=True if pretrained and looks_like_path(pretrained) else None,
    )
    encoder.drop_vision()
    return encoder


def detection_floor(settings: EngineSettings, profile: Profile) -> float:
    """The detector's own confidence: the setting, or RAP's 0.1 when the generator gets RAP's
    candidates (the engine then keeps detections >= the setting for recognition)."""
    policy = retrieval_policy(
        settings.retrieval_policy, profile.generator, settings.generator_adapter
    )
    if policy == "rap":
        return min(settings.detector_confidence, RAP_DETECTOR_CONFIDENCE)
    return settings.detector_confidence


def build_detector(
    profile: Profile, settings: EngineSettings, text_encoder: ClipEmbedder | None
) -> Detector:
    kind, weights = parse_detector_spec(profile.detector)
    if kind == "none":
        return NullDetector()
    prepare_environment(settings)
    _import_ultralytics()
    from ultralytics import YOLO
    from ultralytics.nn.tasks import WorldModel, load_checkpoint

    device = resolve_device(settings.device)
    is_yaml = PurePath(weights).suffix in (".yaml", ".yml")
    path = (
        weights
        if is_yaml and not looks_like_path(weights)
        else str(detector_weight(weights, settings))
    )
    common = dict(
        name=profile.detector,
        device=device,
        confidence=detection_floor(settings, profile),
        image_size=profile.detector_image_size,
        max_detections=settings.max_detections,
    )
    try:
        if kind == "yolo-world":
            with seeded(profile.seed):  # a .yaml builds random weights: make them reproducible
                model = (
                    WorldModel(path, nc=80, verbose=False)
                    if is_yaml
                    else load_checkpoint(path, device="cpu")[0]
                )
        else:
            with seeded(profile.seed):
                yolo = YOLO(path, task="detect")
            model = yolo.model
    except RapbotError:
        raise
    except Exception as error:  # a missing packaged .yaml, a corrupt or foreign file
        raise MissingWeightError(
            f"Could not load detector '{profile.detector}' from {path}: {first_line(error)}"
        ) from None

    if isinstance(model, WorldModel):
        if text_encoder is None:
            raise RapbotError(
                f"Detector '{profile.detector}' is a YOLO-World model: "
                f"name it 'yolo-world:{weights}'."
            )
        text_dim = int(model.txt_feats.shape[-1])
        if text_encoder.dim != text_dim:
            raise RapbotError(
                f"YOLO-World needs {text_dim}-d text features but "
                f"{text_encoder.model_id} gives {text_encoder.dim}: "
                "set RAPBOT_DETECTOR_TEXT_WEIGHTS to OpenAI ViT-B-32 weights."
            )
        return YoloWorldDetector(model, text_encoder.encode_text_for_yolo, **common)
    if kind == "yolo-world":
        raise MissingWeightError(f"Detector '{profile.detector}' is not a YOLO-World model: {path}")

    # Exports (.tflite, .onnx ...) have a fixed batch of 1; PyTorch models batch.
    detector = YoloDetector(yolo, batch_size=8 if PurePath(path).suffix == ".pt" else 1, **common)
    try:  # load the runtime now (LiteRT, ONNX ...), so a broken file fails here and not mid-chat
        from PIL import Image

        detector.detect([Image.new("RGB", (64, 64))], [])
    except Exception as error:
        raise MissingWeightError(
            f"Could not run detector '{profile.detector}' ({path}): {first_line(error)}"
        ) from None
    return detector


def with_micro_batching(models: Models, *, max_batch: int = 16, max_wait_ms: float = 5.0) -> Models:
    """The same models behind batchers (weights shared, nothing reloaded).

    The detector is left as it is when it cannot batch (batch size 1): coalescing its requests
    would add the wait and gain nothing; its own lock already serialises them.
    """
    embedder = models.embedder
    if not isinstance(embedder, BatchingEmbedder):
        embedder = BatchingEmbedder(embedder, max_batch=max_batch, max_wait_ms=max_wait_ms)
    detector = models.detector
    limit = detector_batch_limit(detector, max_batch)
    if limit > 1 and not isinstance(detector, BatchingDetector):
        detector = BatchingDetector(detector, max_batch=limit, max_wait_ms=max_wait_ms)
    # text_encoder stays unwrapped: only YOLO-World calls it, under the detector's lock.
    return replace(models, embedder=embedder, detector=detector)


def micro_batching_from_settings(models: Models, settings: EngineSettings) -> Models:
    if not settings.micro_batching:
        return models
    return with_micro_batching(
        models, max_batch=settings.batch_max_size, max_wait_ms=settings.batch_max_wait_ms
    )


def close_batchers(models: Models) -> None:
    """Stop the batcher threads of models made by :func:`with_micro_batching` (else a no-op)."""
    for part in (models.embedder, models.detector):
        if isinstance(part, (BatchingEmbedder, BatchingDetector)):
            part.close()


def load_models(settings: EngineSettings, *, reuse: bool = True) -> Models:
    """Load (once per configuration) the profile's embedder and detector; logs the time taken."""
    key = settings.model_dump_json()
    with _cache_lock:
        if reuse and key in _cache:
            return _cache[key]
        prepare_environment(settings)
        start = time.perf_counter()
        profile = resolve_profile(settings)
        embedder = build_embedder(profile, settings)
        text_encoder = (
            build_text_encoder(profile, settings, embedder)
            if profile.detector_kind == "yolo-world"
            else None
        )
        detector = build_detector(profile, settings, text_encoder)
        generator = load_generator(profile, settings)
        threshold = profile.match_threshold
        if settings.match_threshold is None:  # a measured one beats the profile's guess
            from engine.calibrate import calibrated_threshold

            measured = calibrated_threshold(settings.data_dir, embedder.model_id)
            threshold = threshold if measured is None else measured
        seconds = time.perf_counter() - start
        models = Models(
            profile,
            embedder,
            detector,
            threshold,
            text_encoder,
            seconds,
            generator,
        )
        # Workers: concurrent requests share forwards (a no-op unless micro_batching is on).
        models = micro_batching_from_settings(models, settings)
        log.info(
            "loaded profile %s in %.1f s: embedder %s (%s), detector %s, match threshold %.4f",
            profile.name,
            seconds,
            embedder.model_id,
            embedder.device,
            detector.name,
            threshold,
        )
        if reuse:
            _cache[key] = models
        return models
