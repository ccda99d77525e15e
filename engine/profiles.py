"""Model profiles: which CLIP, which detector and which thresholds, by name.

A profile is pure data; :mod:`engine.models` builds it. Every field can be overridden by its
own setting (``RAPBOT_CLIP_MODEL``, ``RAPBOT_DETECTOR`` ...), see :func:`resolve_profile`.

Detector specs: ``yolo-world:<weights .pt or packaged .yaml>``, ``yolo:<weights>`` (a plain
YOLO, e.g. a COCO ``.tflite``) or ``none``. A bare value (as in ``RAPBOT_DETECTOR``) is read as
YOLO-World when its file name contains ``world`` and as a plain YOLO otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import PurePath

from engine.settings import EngineSettings

TINY_CLIP = "rapbot-tiny"

# The miniature open_clip model of the ``tiny`` profile. Random ViTs that pool the class token
# map every photo to almost the same vector (measured: mean cosine 0.88 between different
# DreamBooth subjects), because the constant class/position embeddings dominate that token;
# average-pooling the patch tokens keeps different photos apart (mean 0.11) while identical
# pixels still give 1.0. embed_dim 512 = YOLO-World's text embedding size, so the same tower
# can feed its vocabulary.
TINY_CLIP_CONFIG: dict = {
    "embed_dim": 512,
    "vision_cfg": {
        "image_size": 64,
        "patch_size": 16,
        "width": 64,
        "head_width": 32,
        "layers": 2,
        "pool_type": "avg",
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}


@dataclass(frozen=True)
class Profile:
    """Everything needed to build the models of one profile."""

    name: str
    clip_model: str  # open_clip architecture, or TINY_CLIP
    clip_pretrained: str  # open_clip pretrained tag ("openai") or a local file; "" = random init
    detector: str  # detector spec, see the module docstring
    detector_text_model: str  # open_clip architecture whose text tower feeds YOLO-World
    detector_text_pretrained: str  # its weights (tag or file); "" = random init
    match_threshold: float  # cosine below which a crop is "nobody I know"
    detector_image_size: int
    seed: int = 0  # seeds every random initialisation, so builds are reproducible
    random_weights: bool = False
    # Threshold used when the architectures are built with random weights: then only identical
    # pixels are reliably close (measured, random ViT-B-32: different DreamBooth photos up to
    # 0.9996, JPEG q75 re-encode >= 0.99995; random ViT-L-14-336: up to 0.9994 / >= 0.99998).
    random_match_threshold: float = 0.9998
    # Multimodal LLM for answers and captions (engine.generator.load); "" = recognition-only.
    generator: str = ""

    @property
    def detector_kind(self) -> str:
        return parse_detector_spec(self.detector)[0]


def parse_detector_spec(spec: str) -> tuple[str, str]:
    """``(kind, weights)`` with kind one of ``yolo-world``, ``yolo``, ``none``."""
    spec = spec.strip()
    if spec.lower() in ("", "none", "off"):
        return "none", ""
    for kind in ("yolo-world", "yolo"):
        if spec.startswith(kind + ":"):
            return kind, spec[len(kind) + 1 :]
    kind = "yolo-world" if "world" in PurePath(spec).name.lower() else "yolo"
    return kind, spec


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        clip_model=TINY_CLIP,
        clip_pretrained="",
        detector="yolo-world:yolov8n-worldv2.yaml",
        detector_text_model=TINY_CLIP,
        detector_text_pretrained="",
        # Measured on all 158 DreamBooth photos: identical pixels 1.0, JPEG q75 re-encode or
        # half-size >= 0.9999, 2-px shift 0.9989-1.0, 3% crop 0.77-0.99 (not a match: random
        # weights only know identical pixels), different photos <= 0.9986 (same subject) and
        # <= 0.9960 (different subjects).
        match_threshold=0.999,
        detector_image_size=320,
        random_match_threshold=0.999,
    ),
    "cpu": Profile(
        name="cpu",
        clip_model="ViT-B-32",
        clip_pretrained="openai",
        detector="yolo-world:yolov8s-worldv2.pt",
        # YOLO-World was trained with OpenAI CLIP ViT-B/32 text features: same model as the
        # embedder here, so the instance is shared.
        detector_text_model="ViT-B-32",
        detector_text_pretrained="openai",
        # Not measurable offline; CLIP image-image cosine between real photos of one subject
        # is typically ~0.85-0.9, unrelated objects well below 0.8.
        match_threshold=0.8,
        detector_image_size=640,
    ),
    "gpu": Profile(
        name="gpu",
        clip_model="ViT-L-14-336",
        clip_pretrained="openai",
        detector="yolo-world:yolov8x-worldv2.pt",
        detector_text_model="ViT-B-32",
        detector_text_pretrained="openai",
        match_threshold=0.8,
        detector_image_size=640,
        # The released RAP-LLaVA-13b, converted once with `rapbot models convert`.
        generator="rap-llava",
    ),
}


def _random_detector(spec: str) -> str:
    """The same detector architecture without weights: ``x.pt`` -> ultralytics' ``x.yaml``."""
    kind, weights = parse_detector_spec(spec)
    path = PurePath(weights)
    if kind == "none" or path.suffix != ".pt" or len(path.parts) > 1:
        return spec  # a local file or an export: nothing to swap it for
    return f"{kind}:{path.stem}.yaml"


def resolve_profile(settings: EngineSettings) -> Profile:
    """The settings' profile with every non-empty override applied."""
    profile = PROFILES[settings.profile]
    changes: dict = {}
    if settings.clip_model:
        changes["clip_model"] = settings.clip_model
    if settings.clip_pretrained:
        changes["clip_pretrained"] = settings.clip_pretrained
    if settings.detector:
        changes["detector"] = settings.detector
    if settings.detector_text_weights:
        changes["detector_text_pretrained"] = settings.detector_text_weights
    if settings.generator:
        changes["generator"] = settings.generator
    # detector_image_size always has a value; it overrides only when set explicitly.
    if "detector_image_size" in settings.model_fields_set:
        changes["detector_image_size"] = settings.detector_image_size
    profile = replace(profile, **changes)

    if settings.random_weights:
        profile = replace(
            profile,
            clip_pretrained="",
            detector_text_pretrained="",
            detector=_random_detector(profile.detector),
            # Random weights are for retrieval benchmarks; a generator only when asked for.
            generator=settings.generator,
        )
    if not profile.clip_pretrained:  # a random embedder: only identical pixels are close
        profile = replace(
            profile, random_weights=True, match_threshold=profile.random_match_threshold
        )
    if settings.match_threshold is not None:
        profile = replace(profile, match_threshold=settings.match_threshold)
    return profile
