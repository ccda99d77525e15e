"""Which part of a photo a new concept example is cut from.

In order: the user's own box; else the detection whose class matches the concept's category
("my grey cat" → a cat); else the most salient detection; else the whole photo.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.categories import same_category
from engine.errors import InvalidInputError
from engine.types import Box, Detection

MIN_BOX_SIDE = 8


@dataclass(frozen=True)
class Selection:
    box: Box
    label: str  # the detection's class, "" for a user box or the whole photo
    reason: str  # "user box", "category", "salient", "whole photo"


def validate_user_box(box: Box, width: int, height: int) -> Box:
    clipped = box.clipped(width, height)
    if clipped.width < MIN_BOX_SIDE or clipped.height < MIN_BOX_SIDE:
        raise InvalidInputError(
            f"The box {box.as_list()} is empty or outside the photo ({width}×{height} pixels); "
            f"give x1,y1,x2,y2 with x1<x2 and y1<y2 inside the photo."
        )
    return clipped


def salience(detection: Detection, width: int, height: int) -> float:
    """Confident, large and central detections are what a photo is "of"."""
    area_fraction = detection.box.area / float(width * height)
    cx, cy = detection.box.center
    off_centre = abs(cx / width - 0.5) + abs(cy / height - 0.5)  # 0 (centre) .. 1 (corner)
    return detection.score * area_fraction**0.5 * (1.0 - 0.5 * off_centre)


def select_region(
    detections: Sequence[Detection],
    width: int,
    height: int,
    category: str = "",
    user_box: Box | None = None,
) -> Selection:
    if user_box is not None:
        return Selection(validate_user_box(user_box, width, height), "", "user box")
    usable = [
        Detection(d.box.clipped(width, height), d.label, d.score)
        for d in detections
        if d.box.clipped(width, height).width >= MIN_BOX_SIDE
        and d.box.clipped(width, height).height >= MIN_BOX_SIDE
    ]
    matching = [d for d in usable if same_category(d.label, category)]
    if matching:
        best = max(matching, key=lambda d: salience(d, width, height))
        return Selection(best.box, best.label, "category")
    if usable:
        best = max(usable, key=lambda d: salience(d, width, height))
        return Selection(best.box, best.label, "salient")
    return Selection(Box.whole(width, height), "", "whole photo")
