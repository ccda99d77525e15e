"""`rapbot eval rap`: evaluation sets (ours, RAP's and Yo'LLaVA's formats), the runner with a
scripted answerer (scores worked out by hand), the generator's prompts, the engine end to end,
and the CLI on tiny LLaVA."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.errors import InvalidInputError
from engine.eval.rap_eval import (
    RECOGNITION_QUESTION,
    EngineAnswerer,
    GeneratorAnswerer,
    load_eval_set,
    qa_question,
    report,
    run_eval,
    score_json,
    score_predictions,
)
from engine.generator.prompt import CAPTION_QUESTION
from engine.generator.tiny import tiny_model_path
from rapbot.cli import main


def write_set(root: Path) -> Path:
    """Two concepts, two test photos; every task, in our own format."""
    for name, colour in (("mochi", "grey"), ("bo", "orange"), ("t1", "white"), ("t2", "blue")):
        Image.new("RGB", (40, 40), colour).save(root / f"{name}.png")
    data = {
        "concepts": {
            "Mochi": {"image": "mochi.png", "info": "my grey cat", "category": "cat"},
            "Bo": {"images": ["bo.png"], "info": "Alice's corgi", "category": "dog"},
        },
        "caption": [
            {"image": "t1.png", "concepts": ["Mochi"]},
            {"image": "t2.png", "concepts": ["Mochi", "Bo"]},
        ],
        "visual_qa": [
            {
                "image": "t1.png",
                "concept": "Mochi",
                "question": "What color is <Mochi>?",
                "options": {"A": "Grey", "B": "Black"},
                "correct_answer": "A",
            }
        ],
        "text_qa": [
            {
                "concept": "Bo",
                "question": "Is <Bo> a cat or a dog?",
                "options": {"A": "Cat", "B": "Dog"},
                "correct_answer": "B",
            },
            {
                "concept": "Mochi",
                "question": "Is <Mochi> a cat or a dog?",
                "options": {"A": "Cat", "B": "Dog"},
                "correct_answer": "A",
            },
        ],
        "recognition": [
            {"image": "t1.png", "concept": "Mochi", "present": True},
            {"image": "t1.png", "concept": "Bo", "present": False},
            {"image": "t2.png", "concept": "Bo", "present": True},
        ],
    }
    path = root / "set.json"
    path.write_text(json.dumps(data))
    return path


def test_load_eval_set_in_rap_and_yollava_formats(tmp_path) -> None:
    ours = load_eval_set(write_set(tmp_path))
    assert set(ours.concepts) == {"Mochi", "Bo"} and ours.concepts["Bo"].images == ("bo.png",)
    assert ours.path("t1.png") == tmp_path / "t1.png"
    theirs = tmp_path / "theirs.json"
    theirs.write_text(
        json.dumps(
            {
                "caption": {"a.png": ["bo", "mam"]},  # RAP's eval/caption.py input
                "visual_qa": {  # Yo'LLaVA, sks = the concept
                    "bo": {
                        "./bo/1.png": {
                            "question": "What is sks?",
                            "options": {"A": "x", "B": "y"},
                            "correct_answer": "B",
                        }
                    }
                },
                "text_qa": {
                    "bo": {
                        "0": {
                            "question": "Is sks a dog?",
                            "option": {"A": "Yes", "B": "No"},
                            "correct_answer": "A",
                        }
                    }
                },
                "recognition": [  # RAP's recognition_test.json
                    {
                        "image": "b.png",
                        "question": "<image>\nIs <bo> in this image?",
                        "concept": "bo",
                        "type": "negative",
                        "correct_answer": False,
                    }
                ],
            }
        )
    )
    loaded = load_eval_set(theirs, images="/data")
    assert loaded.caption == [{"image": "a.png", "concepts": ["bo", "mam"]}]
    assert loaded.visual_qa[0]["question"] == "What is <bo>?"
    assert loaded.visual_qa[0]["image"] == "./bo/1.png" and loaded.visual_qa[0]["concept"] == "bo"
    assert (
        loaded.text_qa[0]["options"] == {"A": "Yes", "B": "No"}
        and loaded.text_qa[0]["image"] is None
    )
    assert loaded.recognition == [{"image": "b.png", "concept": "bo", "present": False}]
    assert loaded.path("b.png") == Path("/data/b.png")
    (tmp_path / "bad.json").write_text(
        json.dumps({"recognition": [{"image": "x", "concept": "y"}]})
    )
    with pytest.raises(InvalidInputError, match="present"):
        load_eval_set(tmp_path / "bad.json")


class Scripted:
    """An answerer with fixed answers; records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple] = []

    def caption(self, image, hint):
        self.asked.append(("caption", image.name, list(hint)))
        return {"t1.png": "Mochi and Bo on a sofa.", "t2.png": "Mochi naps."}[image.name]

    def ask(self, image, question, hint):
        self.asked.append(("ask", image.name if image else None, question, list(hint)))
        if question.startswith("Is <"):
            return "Yes"
        return "A"


def test_run_eval_and_scores_by_hand(tmp_path) -> None:
    eval_set = load_eval_set(write_set(tmp_path))
    answerer = Scripted()
    run = run_eval(eval_set, answerer, method="scripted")
    assert ("caption", "t2.png", ["Mochi", "Bo"]) in answerer.asked
    assert (
        "ask",
        None,
        qa_question("Is <Bo> a cat or a dog?", {"A": "Cat", "B": "Dog"}),
        ["Bo"],
    ) in answerer.asked
    assert ("ask", "t1.png", RECOGNITION_QUESTION.format(name="Bo"), ["Bo"]) in answerer.asked
    scores = score_predictions(json.loads(json.dumps(run)))  # survives a JSON round trip
    # captions: t1 truth {Mochi}, said {Mochi, Bo} → correct 1; t2 truth {Mochi, Bo}, said {Mochi}
    # → correct 1. truth 3, mentioned 3, correct 2 → recall = precision = F1 = 2/3
    assert (scores.caption.recall, scores.caption.precision) == pytest.approx((2 / 3, 2 / 3))
    assert scores.caption.f1 == pytest.approx(2 / 3)
    # QA, always "A": visual 1/1 right; text-only Bo (B) wrong, Mochi (A) right → 1/2;
    # weighted (1 + 1) / (1 + 2) = 2/3
    assert (scores.qa.visual.accuracy, scores.qa.text_only.accuracy) == (1.0, 0.5)
    assert scores.qa.weighted == pytest.approx(2 / 3)
    # recognition, always "Yes": positives 2/2, negatives 0/1 → weighted (1 + 0) / 2 = 0.5
    assert (scores.recognition.positive.accuracy, scores.recognition.negative.accuracy) == (
        1.0,
        0.0,
    )
    assert scores.recognition.weighted == 0.5
    rows = [line.split() for line in report([run]).splitlines() if line.startswith("scripted")]
    assert rows == [
        ["scripted", "66.67", "66.67", "66.67"],  # Table 3: percent
        ["scripted", "1.000", "0.500", "0.667", "1.000", "0.000", "0.500"],  # Table 4: fractions
        ["scripted", "1.000", "0.500", "0.667"],  # QA, lenient reading: bare letters agree
    ]
    partial = run_eval(eval_set, Scripted(), method="rec", tasks=["recognition"], limit=1)
    assert len(partial["recognition"]) == 1 and "caption" not in partial
    with pytest.raises(InvalidInputError, match="Unknown task"):
        run_eval(eval_set, Scripted(), method="x", tasks=["vqa"])


class RecordingGenerator:
    def __init__(self) -> None:
        self.prompts = []

    def generate(self, prompt, max_new_tokens=None):
        self.prompts.append(prompt)
        return "Mochi"


def test_generator_answerer_prompts(tmp_path) -> None:
    eval_set = load_eval_set(write_set(tmp_path))
    generator = RecordingGenerator()
    answerer = GeneratorAnswerer(generator, eval_set, k=2)
    answerer.caption(eval_set.path("t1.png"), ["Mochi"])
    prompt = generator.prompts[-1]
    text = prompt.text()
    # The true concept plus one distractor up to K=2, each with its crop, after the query image.
    assert "Name: <Mochi>, Info: my grey cat" in text and "Name: <Bo>, Info: Alice's corgi" in text
    assert text.startswith("<image>\n[1.<image>") and text.endswith("]" + CAPTION_QUESTION)
    assert len(prompt.images) == 3
    GeneratorAnswerer(generator, eval_set, k=2, distractors=False).caption(
        eval_set.path("t1.png"), ["Mochi"]
    )
    assert "Bo" not in generator.prompts[-1].text() and len(generator.prompts[-1].images) == 2
    answerer.ask(None, "Question: Is <Bo> a dog?", ["Bo"])  # text-only: no query image
    assert generator.prompts[-1].text() == (
        "1.<image>\n Name: <Bo>, Info: Alice's corgi\nQuestion: Is <Bo> a dog?"
    )


def test_engine_answerer_end_to_end(tiny_engine, dreambooth, tmp_path) -> None:
    """The engine's recognition-only answers over real photos: it knows the remembered ones."""
    cat = str(dreambooth / "cat/00.jpg")
    data = {  # few items: each is a detector + CLIP pass on a real photo
        "concepts": {"Mochi": {"image": cat, "info": "my grey cat", "category": "cat"}},
        "caption": [{"image": cat, "concepts": ["Mochi"]}],
        "recognition": [{"image": cat, "concept": "Mochi", "present": True}],
    }
    (tmp_path / "set.json").write_text(json.dumps(data))
    eval_set = load_eval_set(tmp_path / "set.json")
    answerer = EngineAnswerer(tiny_engine, eval_set)
    run = run_eval(eval_set, answerer, method="engine")
    scores = score_predictions(run)
    assert "Mochi" in run["caption"][0]["output"]
    assert scores.caption.recall == 1.0
    assert scores.recognition.positive.accuracy == 1.0, run["recognition"]
    answerer.close()
    assert tiny_engine.list_concepts(answerer.scope) == []


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    return tiny_model_path("tiny-llava", tmp_path_factory.mktemp("tiny-gen"))


def test_cli_eval_rap_on_tiny_llava(tiny_llava, tmp_path, capsys, monkeypatch) -> None:
    import rapbot.cli.common

    torch.set_num_threads(1)  # see tests/test_rap_train.py: tiny forwards on a busy 2-core CPU
    set_path = write_set(tmp_path)
    pred = tmp_path / "pred.json"
    args = ["eval", "rap", set_path, "--generator", tiny_llava, "--name", "tiny", "--limit", "1"]
    args += ["--max-new-tokens", "4", "--device", "cpu", "--out", pred]
    monkeypatch.setattr(rapbot.cli.common, "stderr_is_terminal", lambda: True)
    assert main([str(a) for a in args]) == 0
    out, err = capsys.readouterr()
    assert "Personalized captioning (Table 3)" in out and "Table 4" in out
    saved = json.loads(pred.read_text())
    # The bar on a terminal: items answered of all of them (at most one per task: --limit 1).
    n = sum(len(saved[t]) for t in ("caption", "visual_qa", "text_qa", "recognition"))
    assert n >= 2 and "eval rap" in err
    assert f"{n}/{n}" in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", err)
    assert saved["method"] == "tiny" and len(saved["caption"]) == 1
    assert all(isinstance(p["output"], str) for t in ("caption", "recognition") for p in saved[t])
    assert main(["--json", "eval", "rap", "--score", str(pred), str(pred)]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 2
    assert set(results[0]) == {"method", "caption", "qa", "qa_lenient", "recognition"}
    assert main(["eval", "rap", str(set_path)]) == 1  # neither --generator nor --engine
    assert "--generator" in capsys.readouterr().err


def test_cli_eval_rap_engine(tiny_models, dreambooth, tmp_path, monkeypatch, capsys) -> None:
    """`--engine`: the engine on the tiny profile (as in tests/test_cli.py); its eval chat is
    forgotten afterwards."""
    import engine.models

    monkeypatch.setattr(engine.models, "load_models", lambda settings: tiny_models[1])
    cat = str(dreambooth / "cat/00.jpg")
    data = {
        "concepts": {"Mochi": {"image": cat, "category": "cat"}},
        "recognition": [{"image": cat, "concept": "Mochi", "present": True}],
    }
    (tmp_path / "set.json").write_text(json.dumps(data))
    args = ["--json", "--profile", "tiny", "--data-dir", tmp_path / "data", "eval", "rap"]
    assert main([str(a) for a in [*args, tmp_path / "set.json", "--engine"]]) == 0
    [result] = json.loads(capsys.readouterr().out)["results"]
    assert result["method"] == "engine (tiny)" and result["recognition"]["positive"] == 1.0
    from engine.engine import Engine
    from engine.settings import EngineSettings

    reopened = Engine.open(EngineSettings(data_dir=tmp_path / "data", profile="tiny"))
    try:
        assert reopened.store.scopes() == []  # nothing of the eval chat is left
    finally:
        reopened.close()


def test_qa_strict_by_default_lenient_as_an_option_both_reported() -> None:
    """Table 4 reads QA answers as RAP's eval_qa.py does (the normalized letter only) unless
    asked otherwise; the other reading is always printed under it and both are in the JSON."""
    options = {"A": "Cat", "B": "Dog"}
    run = {
        "method": "m",
        "visual_qa": [
            {"output": "B. Dog", "options": options, "correct_answer": "B"},  # lenient only
            {"output": "b", "options": options, "correct_answer": "B"},  # both
        ],
        "text_qa": [{"output": "It is a dog.", "options": options, "correct_answer": "B"}],
    }
    scores = score_json(run)
    # strict: visual 1/2, text 0/1, pooled 1/3; lenient: 2/2, 1/1, 3/3
    assert scores["qa"] == {"visual": 0.5, "text_only": 0.0, "weighted": pytest.approx(1 / 3)}
    assert scores["qa_lenient"] == {"visual": 1.0, "text_only": 1.0, "weighted": 1.0}

    def rows(text: str) -> list[list[str]]:
        return [line.split() for line in text.splitlines() if line.startswith("m ")]

    strict = report([run])
    assert "Question answering (strict reading)" in strict and "lenient reading" in strict
    assert rows(strict) == [
        ["m", "0.500", "0.000", "0.333", "-", "-", "-"],
        ["m", "1.000", "1.000", "1.000"],
    ]
    lenient = report([run], qa_reading="lenient")
    assert rows(lenient) == [
        ["m", "1.000", "1.000", "1.000", "-", "-", "-"],
        ["m", "0.500", "0.000", "0.333"],
    ]
