"""Test environment: offline hubs, temporary config folders, paths to the shared real data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before anything imports ultralytics, huggingface_hub or matplotlib.
_CONFIG_TMP = Path(tempfile.mkdtemp(prefix="rapbot-test-config-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_CONFIG_DIR", str(_CONFIG_TMP / "yolo"))
os.environ.setdefault("MPLCONFIGDIR", str(_CONFIG_TMP / "mpl"))
os.environ.setdefault("RAPBOT_OFFLINE", "1")
# Never let a developer's own configuration leak into tests.
for _name in list(os.environ):
    if _name.startswith("RAPBOT_") and _name != "RAPBOT_OFFLINE":
        del os.environ[_name]

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
DREAMBOOTH = SHARED / "data" / "dreambooth" / "dataset"
COCO_TFLITE = SHARED / "models" / "yolov8n-coco-int8.tflite"


@pytest.fixture(scope="session")
def dreambooth() -> Path:
    """The folder of DreamBooth subjects (``cat/00.jpg`` ...); skips when ../shared is absent."""
    if not DREAMBOOTH.is_dir():
        pytest.skip(f"real photos not found at {DREAMBOOTH} (../shared/data is absent)")
    return DREAMBOOTH


@pytest.fixture(scope="session")
def coco_detector_path() -> Path:
    """The real COCO TFLite detector; skips when absent or when its runtime is not installed."""
    if not COCO_TFLITE.is_file():
        pytest.skip(f"real detector not found at {COCO_TFLITE}")
    try:
        import ai_edge_litert  # noqa: F401
    except ImportError:
        pytest.skip("ai-edge-litert is not installed (pip install -e .[dev])")
    return COCO_TFLITE


def _load(tmp_root: Path, **overrides):
    from engine.models import load_models
    from engine.settings import EngineSettings

    settings = EngineSettings(data_dir=tmp_root, profile="tiny", **overrides)
    return settings, load_models(settings)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The `tiny` profile (random seeded CLIP and YOLO-World), built once per test session."""
    return _load(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def coco_models(tmp_path_factory, coco_detector_path):
    """Tiny CLIP with the real COCO detector: real boxes and classes, random embeddings."""
    return _load(tmp_path_factory.mktemp("coco-data"), detector=str(coco_detector_path))


def _engine(loaded, root: Path):
    from engine.engine import Engine
    from engine.store import open_store

    settings, models = loaded
    settings = settings.model_copy(update={"data_dir": root})
    store = open_store(root / "store", models.embedder.model_id, models.embedder.dim)
    return Engine(settings, models, store)


@pytest.fixture
def tiny_engine(tiny_models, tmp_path):
    """A fresh engine with its own empty store on the tiny models."""
    engine = _engine(tiny_models, tmp_path)
    yield engine
    engine.close()


@pytest.fixture
def coco_engine(coco_models, tmp_path):
    """A fresh engine on tiny CLIP + the real COCO detector."""
    engine = _engine(coco_models, tmp_path)
    yield engine
    engine.close()


def group_photo(paths: list[Path], size: int = 400) -> bytes:
    """Several subjects pasted side by side on one canvas: a "group photo" as JPEG bytes."""
    import io

    from PIL import Image

    canvas = Image.new("RGB", (size * len(paths), size), "white")
    for index, path in enumerate(paths):
        with Image.open(path) as photo:
            tile = photo.convert("RGB").resize((size, size))
        canvas.paste(tile, (index * size, 0))
    out = io.BytesIO()
    canvas.save(out, format="JPEG", quality=95)
    return out.getvalue()
