"""Engine configuration: environment variables (``RAPBOT_*``) and an optional ``.env`` file.

A profile (``tiny``, ``cpu``, ``gpu``) picks the model architectures and weights; every part
of it can be overridden by its own setting (see :mod:`engine.profiles`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ProfileName = Literal["tiny", "cpu", "gpu"]


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "rapbot"


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RAPBOT_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    data_dir: Path = Field(
        default_factory=default_data_dir, description="where the store and downloaded weights live"
    )
    profile: ProfileName = Field("cpu", description="model profile: tiny, cpu or gpu")
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:1 ...")

    # Model overrides (empty = the profile's choice).
    clip_model: str = Field("", description="open_clip architecture, e.g. ViT-B-32")
    clip_pretrained: str = Field("", description="open_clip pretrained tag or a local weights file")
    detector: str = Field(
        "",
        description="a YOLO-World .pt/.yaml, a plain YOLO model (.pt/.tflite/.onnx) or none",
    )
    detector_text_weights: str = Field(
        "",
        description="open_clip ViT-B-32 'openai' weights for YOLO-World's vocabulary (tag or file)",
    )
    random_weights: bool = Field(
        False, description="build the profile's architectures with random weights (benchmarks)"
    )
    offline: bool = Field(
        False, description="never download weights (also implied by HF_HUB_OFFLINE=1)"
    )

    # Detection and retrieval.
    detector_confidence: float = Field(0.25, ge=0.0, le=1.0)
    detector_image_size: int = Field(640, ge=32)
    max_detections: int = Field(20, ge=1)
    match_threshold: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="cosine similarity below which a crop is 'nobody I know' (default: profile's)",
    )
    top_k: int = Field(5, ge=1, description="examples looked at per crop")
    embed_batch_size: int = Field(32, ge=1)

    # Untrusted image limits.
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)

    # Concept text limits.
    max_name_length: int = Field(64, ge=1)
    max_description_length: int = Field(300, ge=1)
