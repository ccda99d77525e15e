"""``rapbot eval rap``: run a model over an evaluation set, save its answers, score them.

The evaluation set is one JSON file (paths relative to ``--images``, default its folder)::

    {
      "concepts": {"Mochi": {"image": "db/mochi.jpg", "info": "my grey cat", "category": "cat"}},
      "caption":     [{"image": "test/1.jpg", "concepts": ["Mochi"]}],
      "visual_qa":   [{"image": "test/2.jpg", "concept": "Mochi",
                       "question": "What color is <Mochi>?",
                       "options": {"A": "Grey", "B": "Black"}, "correct_answer": "A"}],
      "text_qa":     [{"concept": "Mochi", "question": "Is <Mochi> a cat or a dog?",
                       "options": {"A": "Cat", "B": "Dog"}, "correct_answer": "A"}],
      "recognition": [{"image": "test/3.jpg", "concept": "Mochi", "present": false}]
    }

Every section is optional. The benchmark files of RAP and Yo'LLaVA load as they are: a
caption dict ``{image: [names]}``, QA nested as ``{concept: {image or "0": {question,
options|option, correct_answer}}}`` with ``sks`` standing for the concept, recognition records
with a boolean ``correct_answer``.

Who answers (an :class:`Answerer`):
- :class:`GeneratorAnswerer` — a generator with the concepts given by the set, as RAP's QA and
  recognition scripts do (the concept named in the question, K=1). Captions get the image's
  concepts plus random others up to K, standing in for RAP's detector + CLIP top-K retrieval
  (which also returns concepts that are not there), so precision means something.
- :class:`EngineAnswerer` — the whole engine (detector, CLIP retrieval, the configured answerer)
  over a scope that remembers the set's concepts.

The answers are saved as a predictions file; scoring and tables read only that file, so runs
of several methods can be tabled together (``rapbot eval rap --score a.json b.json``).
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine.errors import InvalidInputError
from engine.eval.rap_metrics import (
    QA_READINGS,
    CaptionScore,
    QAScore,
    RecognitionScore,
    caption_scores,
    caption_table,
    qa_accuracy,
    qa_recognition_table,
    qa_table,
    recognition_scores,
)
from engine.progress import Progress, counter

log = logging.getLogger(__name__)

TASKS = ("caption", "visual_qa", "text_qa", "recognition")
RECOGNITION_QUESTION = "Is <{name}> in this image? Answer with a single word or phrase."


def qa_question(question: str, options: dict[str, str]) -> str:
    """RAP's multiple-choice prompt (eval/VQA.py and TQA.py), character for character."""
    lines = "".join(f"{letter}. {text}\n" for letter, text in options.items())
    return (
        f"Question: {question}\nOptions:\n{lines}"
        "Please give a single character from the options above. \n"
    )


# ------------------------------------------------------------------------------ the set


@dataclass(frozen=True)
class EvalConcept:
    name: str
    info: str = ""
    images: tuple[str, ...] = ()
    category: str = ""


@dataclass
class EvalSet:
    root: Path
    concepts: dict[str, EvalConcept] = field(default_factory=dict)
    caption: list[dict] = field(default_factory=list)
    visual_qa: list[dict] = field(default_factory=list)
    text_qa: list[dict] = field(default_factory=list)
    recognition: list[dict] = field(default_factory=list)

    def path(self, image: str) -> Path:
        full = Path(image).expanduser()
        return full if full.is_absolute() else self.root / full


def _concepts(raw: Any) -> dict[str, EvalConcept]:
    items = raw.items() if isinstance(raw, dict) else ((c.get("name"), c) for c in raw or [])
    out = {}
    for name, meta in items:
        images = meta.get("images", meta.get("image", []))
        images = [images] if isinstance(images, str) else list(images)
        out[str(name)] = EvalConcept(
            str(name), str(meta.get("info", "")), tuple(images), str(meta.get("category", ""))
        )
    return out


def _captions(raw: Any) -> list[dict]:
    if isinstance(raw, dict):  # RAP: {image: [names]}
        return [{"image": image, "concepts": list(names)} for image, names in raw.items()]
    return [{"image": r["image"], "concepts": list(r.get("concepts", []))} for r in raw or []]


def _qa(raw: Any, visual: bool) -> list[dict]:
    if isinstance(raw, list):
        return [
            {**r, "options": r.get("options", r.get("option")), "concept": r.get("concept")}
            for r in raw
        ]
    items = []  # Yo'LLaVA: {concept: {image-or-index: {question, options|option, answer}}}
    for concept, questions in (raw or {}).items():
        for key, q in questions.items():
            items.append(
                {
                    "image": key if visual else None,
                    "concept": concept,
                    "question": q["question"].replace("sks", f"<{concept}>"),
                    "options": q.get("options", q.get("option")),
                    "correct_answer": q["correct_answer"],
                }
            )
    return items


def _recognition(raw: Any) -> list[dict]:
    items = []
    for r in raw or []:
        present = r["present"] if "present" in r else r.get("correct_answer")
        if not isinstance(present, bool):
            raise InvalidInputError("a recognition item needs 'present': true or false")
        items.append({"image": r["image"], "concept": r["concept"], "present": present})
    return items


def load_eval_set(path: str | Path, images: str | Path | None = None) -> EvalSet:
    """Read an evaluation set (see the module docstring); image paths resolve under ``images``."""
    path = Path(path).expanduser()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"Can't read the evaluation set {path}: {error}") from None
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{path}: the evaluation set is a JSON object with sections")
    try:
        return EvalSet(
            root=Path(images).expanduser() if images else path.parent,
            concepts=_concepts(raw.get("concepts", raw.get("database"))),
            caption=_captions(raw.get("caption")),
            visual_qa=_qa(raw.get("visual_qa"), visual=True),
            text_qa=_qa(raw.get("text_qa"), visual=False),
            recognition=_recognition(raw.get("recognition")),
        )
    except (KeyError, TypeError, AttributeError) as error:
        raise InvalidInputError(f"{path}: malformed evaluation set ({error!r})") from None


# ------------------------------------------------------------------------------ answerers


class Answerer(Protocol):
    def caption(self, image: Path, hint: Sequence[str]) -> str: ...

    def ask(self, image: Path | None, question: str, hint: Sequence[str]) -> str: ...


def _open_image(path: Path):
    from engine.images import load_image_file

    return load_image_file(path)  # data sets come from outside: the upload limits apply


class GeneratorAnswerer:
    """A generator prompted with the set's concepts (``hint``), RAP prompt and all."""

    def __init__(
        self,
        generator,
        eval_set: EvalSet,
        *,
        k: int = 2,
        distractors: bool = True,
        seed: int = 0,
        max_new_tokens: int | None = None,
    ) -> None:
        self.generator = generator
        self.set = eval_set
        self.k = k
        self.distractors = distractors
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self._crops: dict[str, Any] = {}

    def _prompt_concept(self, name: str):
        from engine.generator.prompt import PromptConcept

        concept = self.set.concepts.get(name) or EvalConcept(name)
        if name not in self._crops:
            first = concept.images[0] if concept.images else None
            self._crops[name] = _open_image(self.set.path(first)) if first else None
        return PromptConcept(concept.name, concept.info, self._crops[name])

    def _generate(self, question: str, names: Sequence[str], image: Path | None) -> str:
        from engine.generator.prompt import rap_prompt

        query = _open_image(image) if image else None
        prompt = rap_prompt(question, [self._prompt_concept(n) for n in names], query)
        return self.generator.generate(prompt, max_new_tokens=self.max_new_tokens)

    def caption(self, image: Path, hint: Sequence[str]) -> str:
        from engine.generator.prompt import CAPTION_QUESTION

        names = list(hint)[: self.k]
        if self.distractors:
            rng = random.Random(f"{self.seed}:{image}")
            others = sorted(set(self.set.concepts) - set(names))
            names += rng.sample(others, min(len(others), self.k - len(names)))
            rng.shuffle(names)
        return self._generate(CAPTION_QUESTION, names, image)

    def ask(self, image: Path | None, question: str, hint: Sequence[str]) -> str:
        return self._generate(question, list(hint)[:1], image)


class EngineAnswerer:
    """The engine end to end: a fresh scope remembers the set's concepts, then answers."""

    def __init__(self, engine, eval_set: EvalSet, scope: str | None = None) -> None:
        from engine.types import Box

        self.engine = engine
        self.scope = scope or f"eval-{uuid.uuid4().hex[:12]}"
        self.names: list[str] = []
        try:
            for concept in eval_set.concepts.values():
                for image in concept.images:
                    path = eval_set.path(image)
                    width, height = _open_image(path).size
                    result = engine.remember(
                        self.scope,
                        path.read_bytes(),
                        concept.name,
                        concept.info,
                        "eval",
                        box=Box.whole(width, height),  # the set's images are crops already
                        category=concept.category or None,
                    )
                    if result.created:
                        self.names.append(result.concept.name)
        except BaseException:
            self.close()  # leave nothing of a half-built scope in the user's store
            raise

    def caption(self, image: Path, hint: Sequence[str]) -> str:
        return self.engine.caption(self.scope, image.read_bytes(), "eval").text

    def ask(self, image: Path | None, question: str, hint: Sequence[str]) -> str:
        photo = image.read_bytes() if image else None
        return self.engine.ask(self.scope, photo, question, "eval").text

    def close(self) -> None:
        """Forget the evaluation scope's concepts."""
        from engine.permissions import Actor

        for name in self.names:
            self.engine.forget(self.scope, name, Actor("eval", True))


def evaluate_engine(engine, eval_set: EvalSet, **options: Any) -> dict[str, Any]:
    """:func:`run_eval` with an :class:`EngineAnswerer`, its scope forgotten afterwards."""
    answerer = EngineAnswerer(engine, eval_set)
    try:
        return run_eval(eval_set, answerer, **options)
    finally:
        answerer.close()


# ------------------------------------------------------------------------------ running


def run_eval(
    eval_set: EvalSet,
    answerer: Answerer,
    *,
    method: str,
    tasks: Iterable[str] = TASKS,
    limit: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Ask every item of the chosen tasks; the predictions (answers with their ground truth).
    ``progress("eval rap", done, total)`` counts the items answered."""
    tasks = list(tasks)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise InvalidInputError(f"Unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    chosen = {task: getattr(eval_set, task)[:limit] for task in tasks}
    vocabulary = set(eval_set.concepts) | {n for i in eval_set.caption for n in i["concepts"]}
    out: dict[str, Any] = {"method": method, "vocabulary": sorted(vocabulary)}
    tick = counter(progress, "eval rap", sum(len(items) for items in chosen.values()))
    for task, items in chosen.items():
        out[task] = []
        for item in items:
            out[task].append({**item, "output": _answer(task, item, eval_set, answerer)})
            tick()
    return out


def _answer(task: str, item: dict, eval_set: EvalSet, answerer: Answerer) -> str:
    if task == "caption":
        return answerer.caption(eval_set.path(item["image"]), item["concepts"])
    image = eval_set.path(item["image"]) if item.get("image") else None
    hint = [item["concept"]] if item.get("concept") else []
    if task == "recognition":
        question = RECOGNITION_QUESTION.format(name=item["concept"])
    else:
        question = qa_question(item["question"], item["options"])
    return answerer.ask(image, question, hint)


# ------------------------------------------------------------------------------ scoring


@dataclass(frozen=True)
class Scores:
    caption: CaptionScore | None
    qa: QAScore | None  # strict: the normalized answer is the letter (RAP's eval_qa.py)
    recognition: RecognitionScore | None
    qa_lenient: QAScore | None = None  # the option an answer picks, in words or with a marker

    def qa_read(self, reading: str) -> QAScore | None:
        return self.qa if reading == "strict" else self.qa_lenient


def score_predictions(predictions: dict[str, Any]) -> Scores:
    """RAP's metrics over a predictions dict (``None`` for a task it has no answers for)."""
    caption = None
    if predictions.get("caption"):
        caption = caption_scores(
            ((p["output"], p["concepts"]) for p in predictions["caption"]),
            predictions.get("vocabulary", ()),
        )
    qa = {}
    if predictions.get("visual_qa") or predictions.get("text_qa"):
        for reading in QA_READINGS:
            qa[reading] = QAScore(
                *(
                    qa_accuracy(
                        (
                            (p["output"], p["options"], p["correct_answer"])
                            for p in predictions.get(task, [])
                        ),
                        reading,
                    )
                    for task in ("visual_qa", "text_qa")
                )
            )
    recognition = None
    if predictions.get("recognition"):
        recognition = recognition_scores(
            (p["output"], p["present"]) for p in predictions["recognition"]
        )
    return Scores(caption, qa.get("strict"), recognition, qa.get("lenient"))


def score_json(predictions: dict[str, Any]) -> dict[str, Any]:
    """The scores of one predictions dict as plain JSON (for ``--json``)."""
    scores = score_predictions(predictions)
    out: dict[str, Any] = {"method": predictions.get("method", "")}
    if scores.caption:
        c = scores.caption
        out["caption"] = {"recall": c.recall, "precision": c.precision, "f1": c.f1}
    for key, q in (("qa", scores.qa), ("qa_lenient", scores.qa_lenient)):
        if q:
            out[key] = {
                "visual": q.visual.accuracy if q.visual.total else None,
                "text_only": q.text_only.accuracy if q.text_only.total else None,
                "weighted": q.weighted,
            }
    if scores.recognition:
        r = scores.recognition
        out["recognition"] = {
            "positive": r.positive.accuracy if r.positive.total else None,
            "negative": r.negative.accuracy if r.negative.total else None,
            "weighted": r.weighted,
        }
    return out


def report(runs: Sequence[dict[str, Any]], qa_reading: str = "strict") -> str:
    """Table 3 (captioning) and Table 4 (QA read ``qa_reading``, recognition) for one or more
    prediction sets, then QA under the other reading: both are always reported, the strict one
    (RAP's eval_qa.py) being the paper's."""
    scored = [
        (run.get("method", f"run {i + 1}"), score_predictions(run)) for i, run in enumerate(runs)
    ]
    parts = []
    captions = [(name, s.caption) for name, s in scored if s.caption]
    if captions:
        parts.append(caption_table(captions))
    if qa_reading not in QA_READINGS:
        raise InvalidInputError(f"Unknown QA reading {qa_reading!r}: {', '.join(QA_READINGS)}")
    rest = [
        (name, s.qa_read(qa_reading), s.recognition) for name, s in scored if s.qa or s.recognition
    ]
    if rest:
        parts.append(qa_recognition_table(rest, qa_reading))
    other = next(r for r in QA_READINGS if r != qa_reading)
    others = [(name, s.qa_read(other)) for name, s in scored if s.qa_read(other)]
    if others:
        parts.append(qa_table(others, other))
    return "\n\n".join(parts) if parts else "No answers to score."


def read_predictions(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"Can't read predictions {path}: {error}") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path} is not a predictions file from `rapbot eval rap`")
    return data
