"""`rapbot calibrate`: the recognition threshold measured on subject folders, saved per
embedding model in the data folder and used by the engine (unless the setting overrides)."""

from __future__ import annotations

import json

import pytest

from engine.calibrate import (
    CALIBRATION_FILE,
    PhotoScores,
    best_threshold,
    calibrated_threshold,
    evaluate,
    save_threshold,
    subject_photos,
)
from engine.errors import InvalidInputError
from rapbot.cli import main

PHOTOS = [  # three test photos, hand-made scores
    PhotoScores("cat/01.jpg", "cat", {"cat": 0.90, "dog": 0.60}),
    PhotoScores("cat/02.jpg", "cat", {"cat": 0.70, "dog": 0.75}),
    PhotoScores("dog/01.jpg", "dog", {"cat": 0.50, "dog": 0.85}),
]


def test_metrics_per_threshold_by_hand() -> None:
    # t = 0.65: cat/01 -> cat (right), cat/02 -> dog 0.75 (wrong), dog/01 -> dog (right):
    # named 3, correct 2 -> precision 2/3, recall 2/3. Nobody (own subject left out): cat/01
    # dog 0.60 < t right, cat/02 dog 0.75 wrong, dog/01 cat 0.50 right -> 2/3.
    at = evaluate(PHOTOS, 0.65)
    assert (at.precision, at.recall, at.nobody_accuracy) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    # t = 0.8: cat/01 -> cat, cat/02 nobody named, dog/01 -> dog: precision 2/2, recall 2/3;
    # nobody: every other score < 0.8 -> 3/3.
    at = evaluate(PHOTOS, 0.8)
    assert (at.precision, at.recall, at.nobody_accuracy) == pytest.approx((1.0, 2 / 3, 1.0))
    # Best over the scores seen: 0.76..0.85 all give (2/3 + 1) / 2; the highest such seen
    # score is 0.85 (recall 2/3: dog/01 at 0.85 still named), 0.9 drops dog/01.
    best = best_threshold(PHOTOS)
    assert best.threshold == 0.85 and best.balanced == pytest.approx(5 / 6)


def test_saved_threshold_is_per_model_and_validated(tmp_path) -> None:
    best = evaluate(PHOTOS, 0.8)
    save_threshold(tmp_path, "clip:a", best)
    save_threshold(tmp_path, "clip:b", evaluate(PHOTOS, 0.65))
    assert calibrated_threshold(tmp_path, "clip:a") == 0.8
    assert calibrated_threshold(tmp_path, "clip:b") == 0.65
    assert calibrated_threshold(tmp_path, "clip:c") is None
    (tmp_path / CALIBRATION_FILE).write_text("{not json")
    assert calibrated_threshold(tmp_path, "clip:a") is None  # ignored, with a warning
    with pytest.raises(InvalidInputError, match="two subject folders"):
        subject_photos(tmp_path)


def test_cli_calibrate_on_dreambooth_and_the_engine_uses_it(
    dreambooth, tmp_path, capsys, monkeypatch
) -> None:
    folder = tmp_path / "subjects"
    folder.mkdir()
    for subject in ("cat", "dog", "teapot"):  # links, never copies, of the shared photos
        (folder / subject).symlink_to(dreambooth / subject)
    data = tmp_path / "data"
    args = ["--json", "--profile", "tiny", "--data-dir", str(data), "calibrate", str(folder)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    tests = sum(len(list((folder / s).glob("*.jpg"))) - 1 for s in ("cat", "dog", "teapot"))
    assert report["subjects"] == 3 and report["photos"] == tests
    best = report["best"]
    assert best["threshold"] in [row["threshold"] for row in report["table"]]
    for row in report["table"]:  # the best is best by the rule it was chosen by
        assert (row["recall"] + row["nobody_accuracy"]) / 2 <= best["balanced"] + 1e-9
    saved = json.loads((data / CALIBRATION_FILE).read_text())
    assert saved[report["model_id"]]["match_threshold"] == best["threshold"]

    from engine.models import load_models
    from engine.settings import EngineSettings

    settings = EngineSettings(profile="tiny", data_dir=data)
    assert load_models(settings, reuse=False).match_threshold == best["threshold"]
    override = settings.model_copy(update={"match_threshold": 0.5})
    assert load_models(override, reuse=False).match_threshold == 0.5
