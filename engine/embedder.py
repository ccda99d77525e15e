"""open_clip image and text towers: batched, L2-normalised embeddings as numpy arrays.

Built by :func:`load_clip` from an architecture name and a weight reference (an open_clip
pretrained tag, a local file, or nothing = random init, seeded). The ``tiny`` profile's
miniature architecture (:data:`engine.profiles.TINY_CLIP_CONFIG`) is registered with open_clip
here, so it goes through the same factory, tokenizer and preprocessing as the real models.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import MissingWeightError
from engine.profiles import TINY_CLIP, TINY_CLIP_CONFIG
from engine.settings import EngineSettings
from engine.weights import clip_checkpoint, first_line, looks_like_path

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)
_register_lock = threading.Lock()


def resolve_device(name: str) -> torch.device:
    """``auto`` = the first CUDA GPU when there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic random init without disturbing the caller's global RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class ClipEmbedder:
    """One open_clip model; ``embed_images``/``embed_texts`` give unit-length float32 rows."""

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Any,
        tokenizer: Any,
        model_id: str,
        device: torch.device,
        batch_size: int = 32,
    ) -> None:
        import torch

        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = device
        self.batch_size = batch_size
        self.dtype = _input_dtype(model)
        self.dim = int(_embed_dim(model))
        self._torch = torch

    def __repr__(self) -> str:
        return f"ClipEmbedder({self.model_id!r}, dim={self.dim}, device={self.device})"

    @property
    def has_vision(self) -> bool:
        return getattr(self.model, "visual", None) is not None

    def drop_vision(self) -> None:
        """Free the image tower when only the text tower is used (YOLO-World's vocabulary)."""
        self.model.visual = None

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not self.has_vision:
            raise RuntimeError(f"{self.model_id} was loaded as a text encoder only")
        rows = []
        for start in range(0, len(images), self.batch_size):
            batch = [
                self.preprocess(im if im.mode == "RGB" else im.convert("RGB"))
                for im in images[start : start + self.batch_size]
            ]
            x = self._torch.stack(batch).to(self.device, self.dtype)
            with self._torch.inference_mode():
                rows.append(self._normalised(self.model.encode_image(x)))
        return self._stack(rows)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        rows = [
            self._normalised(self.encode_text_tensor(texts[start : start + self.batch_size]))
            for start in range(0, len(texts), self.batch_size)
        ]
        return self._stack(rows)

    def encode_text_for_yolo(self, texts: Sequence[str]) -> torch.Tensor:
        """``(n, dim)`` float32 unit rows on this model's device, as YOLO-World's ``txt_feats``."""
        feats = self.encode_text_tensor(texts).float()
        return feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def encode_text_tensor(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        with self._torch.inference_mode():
            return self.model.encode_text(tokens)

    def _normalised(self, feats: torch.Tensor) -> np.ndarray:
        feats = feats.float()
        feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return feats.cpu().numpy()

    def _stack(self, rows: list[np.ndarray]) -> np.ndarray:
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)


def _input_dtype(model: Any) -> torch.dtype:
    """The dtype images must have: open_clip's fp16 keeps embeddings and norms in fp32, so the
    first parameter is no guide; the patch embedding (or the most common dtype) is."""
    conv = getattr(getattr(model, "visual", None), "conv1", None)
    if conv is not None:
        return conv.weight.dtype
    return Counter(p.dtype for p in model.parameters()).most_common(1)[0][0]


def _embed_dim(model: Any) -> int:
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "output_dim"):
        return visual.output_dim
    projection = model.text_projection
    return projection.shape[-1] if hasattr(projection, "shape") else projection.out_features


def register_tiny_config() -> None:
    """Make ``rapbot-tiny`` a known open_clip architecture (its public API takes config files)."""
    import open_clip

    with _register_lock:
        if TINY_CLIP in open_clip.list_models():
            return
        with tempfile.TemporaryDirectory(prefix="rapbot-open-clip-") as folder:
            path = Path(folder) / f"{TINY_CLIP}.json"
            path.write_text(json.dumps(TINY_CLIP_CONFIG))
            open_clip.add_model_config(path)  # read into open_clip's registry right away


class _QuietOpenClip(logging.Filter):
    """open_clip logs its factory steps on the root logger, and warns for every random build
    (which we ask for on purpose); keep real warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "open_clip" not in record.pathname:
            return True
        return record.levelno >= logging.WARNING and not str(record.msg).startswith(
            "No pretrained weights loaded"
        )


def _file_tag(path: Path) -> str:
    # Cheap content fingerprint (size + first MiB) so two different files never share a model id.
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
    return f"file-{path.stem}-{digest.hexdigest()[:8]}"


def _model_id(model_name: str, pretrained: str, checkpoint: Path | None, seed: int) -> str:
    """The identity a store records for an embedding model (what its vectors are comparable to)."""
    if not pretrained:
        if model_name == TINY_CLIP:
            return f"open_clip:{model_name}:seed{seed}"
        return f"open_clip:{model_name}:random-seed{seed}"
    if looks_like_path(pretrained) and checkpoint is not None:
        return f"open_clip:{model_name}:{_file_tag(checkpoint)}"
    return f"open_clip:{model_name}:{pretrained}"


def _model_config(model_name: str) -> dict | None:
    """open_clip's config of ``model_name``, read from its config files without importing
    open_clip (which imports torch: seconds a store-only command must not pay)."""
    if model_name == TINY_CLIP:
        return TINY_CLIP_CONFIG
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "model_configs" / f"{model_name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    import open_clip  # a config registered at run time, or another layout

    register_tiny_config()
    return open_clip.get_model_config(model_name)


def clip_identity(
    model_name: str,
    pretrained: str,
    settings: EngineSettings,
    *,
    seed: int = 0,
    setting: str = "RAPBOT_CLIP_PRETRAINED",
) -> tuple[str, int]:
    """``(model_id, dim)`` that :func:`load_clip` would give, without building the model.

    Store-only engines (distributed mode's cpu queue) open the store with it and never load
    weights; a pretrained tag is not even resolved to a file.
    """
    model_name = model_name.replace("/", "-")
    config = _model_config(model_name)
    if config is None:
        raise MissingWeightError(
            f"Unknown open_clip model '{model_name}': see open_clip.list_models()."
        )
    checkpoint = (
        clip_checkpoint(model_name, pretrained, settings, setting)
        if pretrained and looks_like_path(pretrained)
        else None
    )
    return _model_id(model_name, pretrained, checkpoint, seed), int(config["embed_dim"])


def load_clip(
    model_name: str,
    pretrained: str,
    settings: EngineSettings,
    *,
    seed: int = 0,
    setting: str = "RAPBOT_CLIP_PRETRAINED",
    quick_gelu: bool | None = None,
    precision: str | None = None,
) -> ClipEmbedder:
    """Build an open_clip model: ``pretrained`` is a tag, a local file, or "" for random weights.

    ``quick_gelu`` matters for OpenAI weights given as a file (tags know it): None = guess from
    the path (``openai`` in it). ``precision`` defaults to fp16 on CUDA, fp32 elsewhere.
    """
    import open_clip

    register_tiny_config()
    model_name = model_name.replace("/", "-")  # "ViT-B/32" is open_clip's "ViT-B-32"
    if model_name not in open_clip.list_models():  # (hub/local-dir schemas: not supported here)
        raise MissingWeightError(
            f"Unknown open_clip model '{model_name}': see open_clip.list_models()."
        )
    device = resolve_device(settings.device)
    precision = precision or ("fp16" if device.type == "cuda" else "fp32")

    preprocess_override: dict[str, Any] = {}
    if not pretrained:
        checkpoint = None
        model_id = _model_id(model_name, pretrained, None, seed)
        quick_gelu = bool(quick_gelu)
    else:
        checkpoint = clip_checkpoint(model_name, pretrained, settings, setting)
        model_id = _model_id(model_name, pretrained, checkpoint, seed)
        if looks_like_path(pretrained):
            if quick_gelu is None:
                quick_gelu = "openai" in str(checkpoint).lower()
        else:
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
            keys = ("mean", "std", "interpolation", "resize_mode")
            preprocess_override = {k: tag_cfg[k] for k in keys if k in tag_cfg}

    quiet = _QuietOpenClip()
    logging.getLogger().addFilter(quiet)
    try:
        with seeded(seed):
            model = open_clip.create_model(
                model_name,
                pretrained=str(checkpoint) if checkpoint else None,
                precision=precision,
                device=device,
                force_quick_gelu=quick_gelu,
                force_preprocess_cfg=preprocess_override or None,
            )
        tokenizer = open_clip.get_tokenizer(model_name)
    except MissingWeightError:
        raise
    except Exception as error:  # a corrupt or mismatched checkpoint, an HF tokenizer off the hub
        raise MissingWeightError(
            f"Could not load CLIP {model_name} ({checkpoint or 'random'}): {first_line(error)}"
        ) from None
    finally:
        logging.getLogger().removeFilter(quiet)

    cfg = open_clip.get_model_preprocess_cfg(model)
    preprocess = open_clip.image_transform(
        cfg["size"],
        is_train=False,
        mean=cfg.get("mean"),
        std=cfg.get("std"),
        resize_mode=cfg.get("resize_mode"),
        interpolation=cfg.get("interpolation"),
        fill_color=cfg.get("fill_color", 0),
    )
    return ClipEmbedder(model, preprocess, tokenizer, model_id, device, settings.embed_batch_size)
