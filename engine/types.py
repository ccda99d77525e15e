"""Plain data that crosses the engine's boundary.

Everything here is a frozen dataclass of builtins so that the same values can be returned
in-process or serialised by a Celery task unchanged (``dataclasses.asdict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels of the decoded, upright image: [x1, y1) x [y1, y2)."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    @property
    def area(self) -> int:
        return max(0, self.width) * max(0, self.height)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2)

    def as_list(self) -> list[int]:
        return [self.x1, self.y1, self.x2, self.y2]

    def clipped(self, width: int, height: int) -> Box:
        """The box limited to an image of ``width`` x ``height``."""
        return Box(
            min(max(self.x1, 0), width),
            min(max(self.y1, 0), height),
            min(max(self.x2, 0), width),
            min(max(self.y2, 0), height),
        )

    def iou(self, other: Box) -> float:
        inter = Box(
            max(self.x1, other.x1),
            max(self.y1, other.y1),
            min(self.x2, other.x2),
            min(self.y2, other.y2),
        )
        if inter.width <= 0 or inter.height <= 0:
            return 0.0
        union = self.area + other.area - inter.area
        return inter.area / union if union else 0.0

    def overlap(self, other: Box) -> float:
        """How much of the smaller box lies inside the other (0..1): 1 when one box holds the
        other, whatever their sizes (IoU would call a box and its half 0.5)."""
        inter = Box(
            max(self.x1, other.x1),
            max(self.y1, other.y1),
            min(self.x2, other.x2),
            min(self.y2, other.y2),
        )
        smaller = min(self.area, other.area)
        return inter.area / smaller if smaller and inter.width > 0 and inter.height > 0 else 0.0

    @classmethod
    def from_xyxy(cls, values: list[float] | tuple[float, ...]) -> Box:
        x1, y1, x2, y2 = (int(round(float(v))) for v in values)
        return cls(x1, y1, x2, y2)

    @classmethod
    def whole(cls, width: int, height: int) -> Box:
        return cls(0, 0, width, height)


@dataclass(frozen=True)
class Detection:
    """One object the detector found: a box, its class label and the detector's confidence."""

    box: Box
    label: str
    score: float


@dataclass(frozen=True)
class Concept:
    """A remembered person, pet or thing of one scope (chat)."""

    id: str
    scope: str
    name: str
    description: str
    category: str
    owner: str
    created_at: float
    examples: int = 0


@dataclass(frozen=True)
class ExampleHit:
    """One stored example photo that matched a query vector."""

    concept_id: str
    example_id: int
    score: float


@dataclass(frozen=True)
class RememberResult:
    """What ``Engine.remember`` stored: the concept and the box its new example was cut from."""

    concept: Concept
    box: Box
    created: bool  # False when the name existed and an example photo was added


@dataclass(frozen=True)
class Recognition:
    """A concept found in a photo (or named in a question), with where and how sure."""

    concept_id: str
    name: str
    description: str
    category: str
    score: float
    box: Box | None
    position: str = ""  # rough place in the photo, e.g. "on the left"


@dataclass(frozen=True)
class UnknownObject:
    """A detection that matched no remembered concept."""

    label: str
    box: Box
    position: str


@dataclass(frozen=True)
class Answer:
    """A text answer and the concepts it is based on; ``image`` is an annotated JPEG if any."""

    text: str
    concepts: list[Recognition] = field(default_factory=list)
    unknown: list[UnknownObject] = field(default_factory=list)
    image: bytes | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


@dataclass(frozen=True)
class PhotoHit:
    """One search result: the photo's id in the store, its similarity and its source reference."""

    photo_id: int
    score: float
    source: str


@dataclass(frozen=True)
class ConceptSheet:
    """One page of a scope's concepts and their contact sheet (a JPEG; None for no concepts)."""

    concepts: list[Concept]
    page: int
    pages: int
    total: int
    image: bytes | None = None
