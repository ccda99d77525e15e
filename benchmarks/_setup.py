"""What the benchmark scripts share: where the repository and ../shared are, and a scratch
folder with ultralytics' and matplotlib's config folders in it (never the user's home).

Scripts run as ``python benchmarks/NAME.py``, which puts this folder on ``sys.path``."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
DREAMBOOTH = SHARED / "data" / "dreambooth" / "dataset"
COCO_TFLITE = SHARED / "models" / "yolov8n-coco-int8.tflite"

if str(ROOT) not in sys.path:  # the engine, when rapbot is not installed
    sys.path.insert(0, str(ROOT))


def scratch_dir(name: str) -> Path:
    """A new temporary folder for one benchmark run; YOLO and matplotlib write under it."""
    tmp = Path(tempfile.mkdtemp(prefix=f"rapbot-bench-{name}-"))
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp / "yolo"))
    os.environ.setdefault("MPLCONFIGDIR", str(tmp / "mpl"))
    return tmp


def require_photos() -> Path:
    """The DreamBooth photos, or exit with a one-line message when ../shared is absent."""
    if not DREAMBOOTH.is_dir():
        raise SystemExit(f"real photos not found at {DREAMBOOTH}")
    return DREAMBOOTH
