"""Engine configuration: environment variables (``RAPBOT_*``) and an optional ``.env`` file.

A profile (``tiny``, ``cpu``, ``gpu``) picks the model architectures and weights; every part
of it can be overridden by its own setting (see :mod:`engine.profiles`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
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

    # Concept store: FAISS in <data_dir>/store (local mode) or a Qdrant server (distributed).
    store: Literal["faiss", "qdrant"] = Field("faiss", description="concept store: faiss or qdrant")
    qdrant_url: str = Field(
        "",
        description="Qdrant server, e.g. http://qdrant:6333 (empty: on-disk in <data_dir>/qdrant,"
        " one process only; ':memory:' for tests)",
    )
    qdrant_api_key: SecretStr = Field(SecretStr(""), description="Qdrant API key (if any)")
    qdrant_https: bool | None = Field(None, description="force TLS on/off (default: from the URL)")
    qdrant_timeout: float = Field(10.0, gt=0, description="seconds per Qdrant request")
    qdrant_shards: int = Field(
        0, ge=0, description="shards of a collection rapbot creates (cluster; 0: the server's)"
    )
    qdrant_replication_factor: int = Field(
        0, ge=0, description="copies of each shard in a collection rapbot creates (0: server's)"
    )
    qdrant_prefix: str = Field(
        "rapbot",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="collection name prefix (<prefix>_concepts__<model>)",
    )

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

    # Generation (RAP's Generate step); see engine.generator.load for the values.
    generator: str = Field(
        "",
        description="multimodal LLM: a folder, a hub name, rap-llava, rap-phi3, tiny-llava, "
        "tiny-qwen2-vl, or none (recognition-only answers); empty = the profile's",
    )
    generator_adapter: str = Field("", description="a peft (LoRA) adapter folder for the generator")
    generator_load_in_4bit: bool = Field(False, description="4-bit weights (bitsandbytes, CUDA)")
    generator_load_in_8bit: bool = Field(False, description="8-bit weights (bitsandbytes, CUDA)")
    generator_max_new_tokens: int = Field(128, ge=1, le=4096, description="longest answer, tokens")
    generator_context_tokens: int = Field(
        0, ge=0, description="the model's context in tokens for choosing K (0 = from the model)"
    )
    generator_max_concepts: int = Field(
        3, ge=0, le=16, description="most concepts (K) shown to the model in one prompt"
    )

    # Detection and retrieval.
    detector_confidence: float = Field(
        0.25, ge=0.0, le=1.0, description="detections below this confidence are ignored"
    )
    detector_image_size: int = Field(
        640, ge=32, description="detector input size in pixels (default: the profile's)"
    )
    max_detections: int = Field(20, ge=1, description="regions looked at per photo")
    detector_max_categories: int = Field(
        100,
        ge=1,
        description="most of a chat's categories an open-vocabulary detector looks for (those "
        "most concepts have; the general list is always added)",
    )
    match_threshold: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="cosine similarity below which a crop is 'nobody I know' (default: the one "
        "`rapbot calibrate` saved for the embedding model, else the profile's)",
    )
    top_k: int = Field(5, ge=1, description="examples looked at per crop")
    retrieval_policy: Literal["", "rap", "threshold"] = Field(
        "",
        description="concepts given to the generator: rap (RAP's: the chat's categories "
        "detected at confidence 0.1, 2 hits per crop, best first, no threshold) or threshold "
        "(recognized ones only); empty = rap for RAP-trained generators, threshold otherwise",
    )
    embed_batch_size: int = Field(32, ge=1, description="crops per CLIP forward")

    # Micro-batching (engine.batching): concurrent requests in one worker share model forwards.
    micro_batching: bool = Field(
        False, description="coalesce concurrent CLIP and detector calls (GPU workers)"
    )
    batch_max_size: int = Field(16, ge=1, description="most items in one coalesced forward")
    batch_max_wait_ms: float = Field(
        5.0, ge=0.0, le=1000.0, description="longest a request waits for others to batch with"
    )

    # Untrusted image limits.
    max_image_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="uploads larger than this are refused before decoding"
    )
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="images with more pixels are refused from their header"
    )

    # Concept text limits.
    max_name_length: int = Field(64, ge=1, description="longest concept name, characters")
    max_description_length: int = Field(
        300, ge=1, description="longest concept description, characters"
    )

    # Composed image search over a chat's photos (engine.composition, engine.cir.search).
    search_encoder: Literal["clip", "cir-lvlm"] = Field(
        "clip",
        description="photo search encoder: clip (the profile's CLIP, training-free composition)"
        " or cir-lvlm (the encoder in RAPBOT_SEARCH_MODEL); switching needs a re-index",
    )
    search_model: str = Field(
        "", description="cir-lvlm: the folder `rapbot train cir --out` wrote (loaded offline)"
    )
    search_fusion: Literal["product", "sum"] = Field(
        "product",
        description="clip: how a query's parts combine: product (late fusion, every part must"
        " match) or sum (one search with the weighted sum)",
    )
    search_candidates: int = Field(
        200, ge=1, le=10_000, description="clip, product fusion: top photos per query part"
    )
    search_text_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="clip, sum fusion: weight of the text against the photo/concept side (0..1)",
    )

    @model_validator(mode="after")
    def _search_model_is_named(self) -> EngineSettings:
        # Only that it is set: whether the folder exists is checked where the encoder loads
        # (a bot or cpu-only worker validates the same settings without the model's files).
        if self.search_encoder == "cir-lvlm" and not self.search_model.strip():
            raise ValueError(
                "RAPBOT_SEARCH_MODEL must name the folder `rapbot train cir` wrote when"
                " RAPBOT_SEARCH_ENCODER=cir-lvlm (or set RAPBOT_SEARCH_ENCODER=clip)"
            )
        return self
