"""Calibrating the recognition threshold (``rapbot calibrate PHOTOS_DIR``).

The threshold below which a crop is "nobody I know" depends on the embedding model, so it is
measured rather than guessed. A photo folder holds one folder per subject (the DreamBooth
layout: ``dog/00.jpg``, ``dog/01.jpg``, ``cat/00.jpg`` ...). Each subject's first photo (by
name) is remembered, as a user would, in a throw-away store; every other photo is then looked
at the way recognition looks at it (detections, crops, CLIP, the store's search), keeping each
subject's best score over the photo's regions. At a threshold ``t``:

- a photo **of a remembered subject** is recognized correctly when its own subject scores
  highest and at least ``t``; it counts towards *recall* (correct / photos) and *precision*
  (correct / photos where someone was named);
- the same photo with its own subject left out is a photo of **nobody I know** (the subject
  was never remembered): it is right when no other subject reaches ``t`` (*nobody accuracy*).

The best threshold maximises the mean of recall and nobody accuracy (both kinds of photo count
equally; ties go to the higher threshold, the safer mistake) and is written into the data
folder (``calibration.json``, per embedding model), where :func:`calibrated_threshold` finds it
when the engine starts. ``RAPBOT_MATCH_THRESHOLD`` still overrides it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.errors import InvalidInputError

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
REPORT_ROWS = 9  # thresholds shown in the report, spread over the scores seen


@dataclass(frozen=True)
class PhotoScores:
    """One test photo: its subject and every remembered subject's best score in it."""

    path: str
    subject: str
    scores: dict[str, float]


@dataclass(frozen=True)
class ThresholdResult:
    threshold: float
    precision: float
    recall: float
    nobody_accuracy: float

    @property
    def balanced(self) -> float:
        return (self.recall + self.nobody_accuracy) / 2


@dataclass
class Calibration:
    model_id: str
    subjects: int
    photos: int
    best: ThresholdResult
    table: list[ThresholdResult] = field(default_factory=list)
    written_to: str | None = None

    def as_json(self) -> dict:
        return {
            "model_id": self.model_id,
            "subjects": self.subjects,
            "photos": self.photos,
            "best": {**asdict(self.best), "balanced": self.best.balanced},
            "table": [asdict(row) for row in self.table],
            "written_to": self.written_to,
        }


def subject_photos(folder: str | Path) -> dict[str, list[Path]]:
    """Subject name -> its photos, sorted; subjects need at least two photos."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InvalidInputError(f"{root} is not a folder of subject folders.")
    subjects = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        photos = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(photos) >= 2:
            subjects[sub.name] = photos
    if len(subjects) < 2:
        raise InvalidInputError(
            f"{root} needs at least two subject folders with two photos or more each "
            "(e.g. dog/00.jpg, dog/01.jpg, cat/00.jpg, cat/01.jpg)."
        )
    return subjects


def evaluate(photos: Sequence[PhotoScores], threshold: float) -> ThresholdResult:
    """Precision, recall and nobody accuracy at one threshold (see the module docstring)."""
    named = correct = nobody_right = 0
    for photo in photos:
        best = max(photo.scores, key=photo.scores.get, default=None)
        if best is not None and photo.scores[best] >= threshold:
            named += 1
            correct += best == photo.subject
        others = [s for name, s in photo.scores.items() if name != photo.subject]
        nobody_right += not others or max(others) < threshold
    total = len(photos)
    return ThresholdResult(
        threshold=round(threshold, 6),
        precision=correct / named if named else 1.0,
        recall=correct / total if total else 0.0,
        nobody_accuracy=nobody_right / total if total else 0.0,
    )


def best_threshold(photos: Sequence[PhotoScores]) -> ThresholdResult:
    """The threshold with the best mean of recall and nobody accuracy, among the scores seen
    (a threshold between two seen scores changes nothing); ties: the higher threshold."""
    seen = sorted({s for p in photos for s in p.scores.values()})
    if not seen:
        raise InvalidInputError("No scores to calibrate on: nothing was remembered.")
    results = [evaluate(photos, t) for t in seen]
    return max(results, key=lambda r: (round(r.balanced, 9), r.threshold))


def report_table(photos: Sequence[PhotoScores], best: ThresholdResult) -> list[ThresholdResult]:
    """The best threshold among a few spread evenly over the scores seen."""
    scores = [s for p in photos for s in p.scores.values()]
    low, high = min(scores), max(scores)
    steps = [low + (high - low) * i / (REPORT_ROWS - 1) for i in range(REPORT_ROWS)]
    rows = {round(t, 6): evaluate(photos, t) for t in steps}
    rows[best.threshold] = best
    return [rows[t] for t in sorted(rows)]


def score_photos(
    engine, subjects: dict[str, list[Path]], progress: Callable[[int, int], None] | None = None
) -> list[PhotoScores]:
    """Remember each subject's first photo in ``engine`` (a throw-away store), then every
    subject's best score in each other photo, as recognition computes it."""
    from engine.images import load_image_file
    from engine.retriever import regions_from_detections
    from engine.timing import StageTimer

    scope = "calibrate"
    names: dict[str, str] = {}  # concept id -> subject
    for subject, photos in subjects.items():
        result = engine.remember(scope, photos[0].read_bytes(), subject, "", "calibrate")
        names[result.concept.id] = subject
    tests = [(subject, photo) for subject, photos in subjects.items() for photo in photos[1:]]
    out = []
    for done, (subject, path) in enumerate(tests, start=1):
        picture = load_image_file(path)
        timer = StageTimer()
        regions = regions_from_detections(
            engine._detect(scope, picture, timer), picture.width, picture.height
        )
        vectors = engine.models.embedder.embed_images(engine.retriever.crops(picture, regions))
        best: dict[str, float] = {}
        for hits in engine.store.search(scope, vectors, engine.store.count(scope)):
            for hit in hits:
                name = names[hit.concept_id]
                best[name] = max(best.get(name, float("-inf")), float(hit.score))
        out.append(PhotoScores(str(path), subject, best))
        if progress:
            progress(done, len(tests))
    return out


def calibrate(settings, folder: str | Path, *, write: bool = True, progress=None) -> Calibration:
    """Measure the threshold for the configured embedding model on ``folder`` and (``write``)
    save it in the data folder for the engine to use."""
    from engine.engine import Engine
    from engine.models import load_models
    from engine.store import open_store

    subjects = subject_photos(folder)
    models = load_models(settings)
    embedder = models.embedder
    with tempfile.TemporaryDirectory(prefix="rapbot-calibrate-") as tmp:
        store = open_store(Path(tmp) / "store", embedder.model_id, embedder.dim)
        engine = Engine(settings.model_copy(update={"data_dir": Path(tmp)}), models, store)
        try:
            photos = score_photos(engine, subjects, progress)
        finally:
            engine.close()
    best = best_threshold(photos)
    result = Calibration(
        embedder.model_id, len(subjects), len(photos), best, report_table(photos, best)
    )
    if write:
        result.written_to = str(save_threshold(settings.data_dir, embedder.model_id, best))
    return result


def save_threshold(data_dir: str | Path, model_id: str, best: ThresholdResult) -> Path:
    """Record ``best`` for ``model_id`` in ``<data_dir>/calibration.json`` (other models kept)."""
    path = Path(data_dir).expanduser() / CALIBRATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read(path)
    data[model_id] = {"match_threshold": best.threshold, **asdict(best)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return path


def calibrated_threshold(data_dir: str | Path, model_id: str) -> float | None:
    """The threshold ``rapbot calibrate`` measured for ``model_id``, if any."""
    entry = _read(Path(data_dir).expanduser() / CALIBRATION_FILE).get(model_id)
    value = entry.get("match_threshold") if isinstance(entry, dict) else None
    if isinstance(value, (int, float)) and -1.0 <= value <= 1.0:
        return float(value)
    return None


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as error:
        log.warning("ignoring unreadable %s: %s", path, error)
        return {}
    return data if isinstance(data, dict) else {}
