"""Regenerate the pictures in docs/img that come from code: a /concepts contact sheet.

The web chat's screenshot comes from its browser test:
``WEB_CHAT_SCREENSHOTS=docs/img python -m pytest -q tests/test_web.py -k browser``.
Run from the repository root: ``python scripts/doc_images.py`` (tiny models, offline).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DREAMBOOTH = ROOT.parent / "shared" / "data" / "dreambooth" / "dataset"
# (name, subject folder, who taught it): names in several scripts, as chats have them.
CONCEPTS = [
    ("Mochi", "cat", "web:Ada Lovelace"),
    ("Rex", "dog", "tg:1029384756"),
    ("Bo", "dog2", "web:Ada Lovelace"),
    ("小虎", "cat2", "dc:4471"),
    ("Тедди", "bear_plushie", "web:Grace Hopper"),
    ("ダック", "duck_toy", "tg:55501"),
    ("Red boot", "fancy_boot", "web:Grace Hopper"),
    ("Robo", "robot_toy", "dc:4471"),
]


def main() -> int:
    os.environ.setdefault("RAPBOT_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from engine.engine import Engine
    from engine.images import decode_image
    from engine.settings import EngineSettings

    with tempfile.TemporaryDirectory() as data:
        engine = Engine.open(EngineSettings(data_dir=Path(data), profile="tiny"))
        for name, subject, owner in CONCEPTS:
            photo = (DREAMBOOTH / subject / "00.jpg").read_bytes()
            engine.remember("web:docs", photo, name, user=owner)
        sheet = engine.concept_sheet("web:docs")
        engine.close()
    out = ROOT / "docs" / "img" / "contact-sheet.png"
    picture = decode_image(sheet.image)
    picture.quantize(colors=128).save(out, optimize=True)
    width, height = picture.size
    print(f"{out.relative_to(ROOT)}: {width}x{height}, {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
