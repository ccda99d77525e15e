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
