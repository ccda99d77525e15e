"""RAP's evaluation metrics (arXiv 2410.13360, Tables 3 and 4) as pure functions, and their tables.

- Personalized captioning: recall, precision and F1 of concept *names* in generated captions.
  Recall = correctly named concepts / concepts in the images; precision = correctly named
  concepts / concept names mentioned. Counts are pooled over the whole set (micro average), so
  a caption that names nobody lowers recall without making precision undefined.
- Question answering (Yo'LLaVA format): two-option multiple choice; the option is parsed from the
  generated text. Visual and text-only accuracy, and their question-count-weighted mean.
- Recognition: "Is <Mochi> in this image?" answered yes/no. Accuracy on positives (present),
  on negatives (absent) and their plain mean — Yo'LLaVA's "weighted" accuracy, which keeps the
  many negatives from drowning the few positives.

An answer that cannot be parsed counts as wrong (RAP's own scorer needs an exact "A"/"B").
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# ------------------------------------------------------------------------------ captioning


def _name_pattern(name: str) -> re.Pattern[str]:
    # Whole-name match, case-insensitive: "Bo" must not match "Bob", but "Bo's" and "<Bo>" do.
    return re.compile(r"(?<!\w)" + re.escape(name.strip()) + r"(?!\w)", re.IGNORECASE)


def mentioned_names(text: str, vocabulary: Iterable[str]) -> set[str]:
    """The names from ``vocabulary`` that ``text`` mentions, each counted once.

    Longer names are matched first and their spans blanked, so "shiba-gray" does not also count
    as a mention of a concept called "shiba".
    """
    found: set[str] = set()
    remaining = text
    for name in sorted({n for n in vocabulary if n.strip()}, key=len, reverse=True):
        pattern = _name_pattern(name)
        if pattern.search(remaining):
            found.add(name)
            remaining = pattern.sub(lambda m: " " * len(m.group(0)), remaining)
    return found


@dataclass(frozen=True)
class CaptionScore:
    recall: float
    precision: float
    f1: float
    images: int
    truth: int  # concepts in the images
    mentioned: int  # concept names mentioned in the captions
    correct: int  # mentioned and in the image


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def caption_scores(
    items: Iterable[tuple[str, Iterable[str]]], vocabulary: Iterable[str] = ()
) -> CaptionScore:
    """Score ``(caption, names of the concepts in the image)`` pairs.

    ``vocabulary`` is every concept name the model could mention (the concept database); the
    ground-truth names are always part of it. Names are compared case-insensitively.
    """
    pairs = [(caption, {n.strip() for n in names if n.strip()}) for caption, names in items]
    vocab = {n.strip() for n in vocabulary if n.strip()}
    for _, names in pairs:
        vocab |= names
    truth = mentioned = correct = 0
    for caption, names in pairs:
        said = {n.casefold() for n in mentioned_names(caption, vocab)}
        gold = {n.casefold() for n in names}
        truth += len(gold)
        mentioned += len(said)
        correct += len(said & gold)
    recall, precision = _ratio(correct, truth), _ratio(correct, mentioned)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return CaptionScore(recall, precision, f1, len(pairs), truth, mentioned, correct)


# -------------------------------------------------------------------------- multiple choice


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (RAP's ``eval_qa`` normalization)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


# "A." "(B)" "A)" "B:" "answer is A" "answer: B" "option A" — a letter with an explicit marker.
_MARKED_LETTER = re.compile(
    r"(?:^|\b(?:answer(?:\s+is)?|option)\s*:?\s*)\(?([A-Za-z])(?:[.):]|\)|$|\s*$)",
    re.IGNORECASE,
)


def parse_option(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a generated answer picks, or ``None`` when it picks none or several.

    In order: the whole answer is a letter ("B", "b."); a marked letter ("A.", "(B)",
    "the answer is A"); exactly one option's text appears in the answer ("Dog", "It's a dog").
    A bare leading letter followed by a word ("A cat face") is read as text, not as option A.
    """
    letters = {k.strip().upper(): v for k, v in options.items()}
    stripped = text.strip()
    bare = stripped.strip(" .:()[]*\"'").upper()
    if bare in letters:
        return bare
    for match in _MARKED_LETTER.finditer(stripped):
        letter = match.group(1).upper()
        if letter in letters:
            return letter
    answer = f" {normalize_answer(stripped)} "
    hits = {
        letter: f" {normalize_answer(value)} "
        for letter, value in letters.items()
        if normalize_answer(value) and f" {normalize_answer(value)} " in answer
    }
    # "black cat" contains both "cat" and "black cat": the longer option is the one meant.
    longest = [k for k, v in hits.items() if not any(v in w and v != w for w in hits.values())]
    return longest[0] if len(longest) == 1 else None


@dataclass(frozen=True)
class AccuracyScore:
    accuracy: float
    correct: int
    total: int


def _accuracy(outcomes: Iterable[bool]) -> AccuracyScore:
    values = list(outcomes)
    return AccuracyScore(_ratio(sum(values), len(values)), sum(values), len(values))


QA_READINGS = ("strict", "lenient")


def strict_correct(text: str, correct: str) -> bool:
    """RAP's ``eval_qa.py``: right only when the normalized answer is the normalized letter.

    Kept exactly, quirk included: "a" is an article, so the letter A normalizes to "" and an
    answer that normalizes to "" (empty, or just "A." / "the") counts as A."""
    return normalize_answer(text) == normalize_answer(correct)


def qa_accuracy(
    items: Iterable[tuple[str, Mapping[str, str], str]], reading: str = "strict"
) -> AccuracyScore:
    """Accuracy over ``(generated answer, options, correct letter)`` triples: ``strict`` as the
    paper scores it (:func:`strict_correct`), ``lenient`` reading the option an answer picks
    in words or with a marker (:func:`parse_option`)."""
    if reading not in QA_READINGS:
        raise ValueError(f"unknown QA reading {reading!r} ({', '.join(QA_READINGS)})")
    if reading == "strict":
        return _accuracy(strict_correct(text, correct) for text, _, correct in items)
    return _accuracy(
        parse_option(text, options) == correct.strip().upper() for text, options, correct in items
    )


@dataclass(frozen=True)
class QAScore:
    visual: AccuracyScore
    text_only: AccuracyScore

    @property
    def weighted(self) -> float:
        """Both sets pooled: each question counts once (RAP's .935/.938 → .936)."""
        return _ratio(
            self.visual.correct + self.text_only.correct, self.visual.total + self.text_only.total
        )


# ------------------------------------------------------------------------------ recognition

_YES = {"yes", "yeah", "yep", "true", "correct"}
_NO = {"no", "nope", "not", "false", "absent"}


def parse_yes_no(text: str) -> bool | None:
    """``True`` for a yes, ``False`` for a no, ``None`` when the answer says neither (or both).

    The first word decides ("Yes, Mochi is on the left."); otherwise a single kind of yes/no
    word anywhere in the answer ("I think so: yes").
    """
    words = normalize_answer(text).split()
    if not words:
        return None
    if words[0] in _YES:
        return True
    if words[0] in _NO:
        return False
    yes, no = any(w in _YES for w in words), any(w in _NO for w in words)
    return yes if yes != no else None


@dataclass(frozen=True)
class RecognitionScore:
    positive: AccuracyScore  # concept present: the right answer is yes
    negative: AccuracyScore  # concept absent: the right answer is no

    @property
    def weighted(self) -> float:
        """Yo'LLaVA's weighted accuracy: the mean of positive and negative accuracy."""
        return (self.positive.accuracy + self.negative.accuracy) / 2


def recognition_scores(items: Iterable[tuple[str, bool]]) -> RecognitionScore:
    """Score ``(generated answer, concept present?)`` pairs."""
    pairs = [(parse_yes_no(text), present) for text, present in items]
    return RecognitionScore(
        positive=_accuracy(said is True for said, present in pairs if present),
        negative=_accuracy(said is False for said, present in pairs if not present),
    )


# ------------------------------------------------------------------------------------ tables


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([title, rule, line(header), rule, *(line(r) for r in rows), rule])


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _frac(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def caption_table(rows: Sequence[tuple[str, CaptionScore]]) -> str:
    """Laid out like the paper's Table 3: Recall / Precision / F1 in percent per method."""
    return _table(
        ["Method", "Recall", "Precision", "F1-score"],
        [[name, _pct(s.recall), _pct(s.precision), _pct(s.f1)] for name, s in rows],
        "Personalized captioning (Table 3)",
    )


def qa_table(rows: Sequence[tuple[str, QAScore]], reading: str) -> str:
    """QA alone (visual / text-only / weighted) under one reading of the answers."""
    return _table(
        ["Method", "QA Visual", "QA Text-only", "QA Weighted"],
        [
            [
                name,
                _frac(qa.visual.accuracy if qa.visual.total else None),
                _frac(qa.text_only.accuracy if qa.text_only.total else None),
                _frac(qa.weighted),
            ]
            for name, qa in rows
        ],
        f"Question answering, {reading} reading",
    )


def qa_recognition_table(
    rows: Sequence[tuple[str, QAScore | None, RecognitionScore | None]],
    reading: str = "strict",
) -> str:
    """Laid out like the paper's Table 4: QA (visual / text-only / weighted, answers read
    ``reading``) and recognition (positive / negative / weighted), as fractions; ``-`` where a
    method has no such results."""
    header = ["Method", "QA Visual", "QA Text-only", "QA Weighted", "Rec Positive"]
    header += ["Rec Negative", "Rec Weighted"]
    body = []
    for name, qa, rec in rows:
        body.append(
            [
                name,
                _frac(qa.visual.accuracy if qa and qa.visual.total else None),
                _frac(qa.text_only.accuracy if qa and qa.text_only.total else None),
                _frac(qa.weighted if qa else None),
                _frac(rec.positive.accuracy if rec and rec.positive.total else None),
                _frac(rec.negative.accuracy if rec and rec.negative.total else None),
                _frac(rec.weighted if rec else None),
            ]
        )
    return _table(
        header, body, f"Question answering ({reading} reading) and visual recognition (Table 4)"
    )
