"""RAP's metrics on small hand-made cases; every expected number is worked out in a comment."""

from __future__ import annotations

import pytest

from engine.eval.rap_metrics import (
    AccuracyScore,
    QAScore,
    RecognitionScore,
    caption_scores,
    caption_table,
    mentioned_names,
    parse_option,
    parse_yes_no,
    qa_accuracy,
    qa_recognition_table,
    recognition_scores,
    strict_correct,
)

# --------------------------------------------------------------------------------- captioning


def test_mentioned_names_whole_names_case_insensitive_longest_first() -> None:
    vocab = ["Bo", "Mochi", "shiba", "shiba-gray"]
    assert mentioned_names("<Mochi> sleeps next to Bob.", vocab) == {"Mochi"}  # Bob is not Bo
    assert mentioned_names("bo's ball and MOCHI", vocab) == {"Bo", "Mochi"}
    # "shiba-gray" is matched first and blanked: it is not also a mention of "shiba".
    assert mentioned_names("shiba-gray runs", vocab) == {"shiba-gray"}
    assert mentioned_names("shiba-gray and shiba play", vocab) == {"shiba-gray", "shiba"}
    assert mentioned_names("nobody here", vocab) == set()


def test_caption_scores_micro_recall_precision_f1() -> None:
    items = [
        # image 1 holds Mochi and Bo; the caption names Mochi only  → truth 2, said 1, correct 1
        ("Mochi is asleep on the sofa.", ["Mochi", "Bo"]),
        # image 2 holds Bo; the caption names Bo and (wrongly) Rex   → truth 1, said 2, correct 1
        ("Bo chases Rex in the park.", ["Bo"]),
        # image 3 holds Rex; the caption names nobody                → truth 1, said 0, correct 0
        ("A dog in the snow.", ["Rex"]),
        # image 4 holds Mochi; the caption names Mochi twice (once)  → truth 1, said 1, correct 1
        ("mochi and Mochi again", ["Mochi"]),
    ]
    score = caption_scores(items, vocabulary=["Mochi", "Bo", "Rex", "Kiwi"])
    # pooled: truth = 2+1+1+1 = 5, mentioned = 1+2+0+1 = 4, correct = 1+1+0+1 = 3
    assert (score.images, score.truth, score.mentioned, score.correct) == (4, 5, 4, 3)
    assert score.recall == pytest.approx(3 / 5)  # 0.6
    assert score.precision == pytest.approx(3 / 4)  # 0.75
    # F1 = 2·0.75·0.6 / (0.75 + 0.6) = 0.9 / 1.35 = 2/3
    assert score.f1 == pytest.approx(2 / 3)


def test_caption_vocabulary_includes_ground_truth_and_edge_cases() -> None:
    # "Kiwi" is only in the ground truth, not in the given vocabulary: it is still recognised.
    # truth 1, mentioned 1, correct 1 → recall = precision = F1 = 1
    score = caption_scores([("Kiwi on a branch", ["Kiwi"])])
    assert (score.recall, score.precision, score.f1) == (1.0, 1.0, 1.0)
    # Nothing mentioned, nothing to find: every ratio is 0 rather than a division by zero.
    empty = caption_scores([])
    assert (empty.recall, empty.precision, empty.f1) == (0.0, 0.0, 0.0)
    # Names only mentioned, none in the images: truth 0, mentioned 1, correct 0 → all 0.
    wrong = caption_scores([("Mochi!", [])], vocabulary=["Mochi"])
    assert (wrong.truth, wrong.mentioned, wrong.recall, wrong.precision) == (0, 1, 0.0, 0.0)


# ---------------------------------------------------------------------------- multiple choice

OPTIONS = {"A": "Cat", "B": "Dog"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        (" a. ", "A"),
        ("(B)", "B"),
        ("A. Cat", "A"),
        ("B: Dog", "B"),
        ("The answer is B.", "B"),
        ("Answer: A", "A"),
        ("Dog", "B"),
        ("It is a dog.", "B"),
        ("It is a cat, not a dog.", None),  # both options named: no pick
        ("I cannot tell.", None),
        ("", None),
    ],
)
def test_parse_option(text: str, expected: str | None) -> None:
    assert parse_option(text, OPTIONS) == expected


def test_parse_option_article_and_longest_option() -> None:
    # "A cat face" starts with the article "a", not with option A: read as text → option B.
    assert parse_option("A cat face", {"A": "A dog face", "B": "A cat face"}) == "B"
    # "black cat" contains both "cat" and "black cat": the longer option wins.
    assert parse_option("a black cat", {"A": "Cat", "B": "Black cat"}) == "B"


def test_qa_strict_reading_is_rap_eval_qa() -> None:
    """Strict (the default): the normalized answer must equal the normalized letter, exactly as
    RAP's eval_qa.py compares them."""
    items = [
        ("B", OPTIONS, "B"),  # right: "b" == "b"
        ("(B).", OPTIONS, "B"),  # right: punctuation goes, "b" == "b"
        ("Dog", OPTIONS, "B"),  # wrong: "dog" != "b" (the lenient reading says right)
        ("B. Dog", OPTIONS, "B"),  # wrong: "b dog" != "b"
        ("The answer is B", OPTIONS, "B"),  # wrong: "answer is b" != "b"
        # upstream's quirk, kept: "a" is an article, so the letter A normalizes to ""
        ("A", OPTIONS, "A"),  # right: "" == ""
        ("", OPTIONS, "A"),  # right (!): an empty answer also normalizes to ""
        ("A cat", OPTIONS, "A"),  # wrong: "cat" != ""
    ]
    assert [strict_correct(text, correct) for text, _, correct in items] == [
        True,
        True,
        False,
        False,
        False,
        True,
        True,
        False,
    ]
    # 4 right of 8 strictly; leniently all but the empty answer (no option picked) = 7 of 8
    assert qa_accuracy(items) == AccuracyScore(0.5, 4, 8)
    assert qa_accuracy(items, "lenient") == AccuracyScore(0.875, 7, 8)
    with pytest.raises(ValueError):
        qa_accuracy(items, "generous")


def test_qa_accuracy_and_weighted() -> None:
    visual = qa_accuracy(
        [
            ("A", OPTIONS, "A"),  # right
            ("Dog", OPTIONS, "B"),  # right (option text)
            ("B", OPTIONS, "A"),  # wrong
            ("no idea", OPTIONS, "B"),  # unparsed → wrong
        ],
        "lenient",
    )
    # 2 right of 4 → 0.5
    assert visual == AccuracyScore(0.5, 2, 4)
    text_only = qa_accuracy([("B", OPTIONS, "b"), ("Cat", OPTIONS, "A")], "lenient")
    # 2 right of 2 → 1.0 (the correct letter is compared case-insensitively)
    assert text_only == AccuracyScore(1.0, 2, 2)
    # weighted pools the questions: (2 + 2) / (4 + 2) = 4/6 = 0.667, not (0.5 + 1.0) / 2 = 0.75
    assert QAScore(visual, text_only).weighted == pytest.approx(4 / 6)


# -------------------------------------------------------------------------------- recognition


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", True),
        ("yes, Mochi is on the left.", True),
        ("No.", False),
        ("Not in this image.", False),
        ("I think so: yes", True),
        ("yes and no", True),  # the first word decides
        ("Maybe", None),
        ("well, yes or no", None),  # both kinds, neither first
        ("", None),
    ],
)
def test_parse_yes_no(text: str, expected: bool | None) -> None:
    assert parse_yes_no(text) is expected


def test_recognition_scores_positive_negative_weighted() -> None:
    score = recognition_scores(
        [
            ("Yes", True),  # positive, right
            ("yes.", True),  # positive, right
            ("No", True),  # positive, wrong
            ("No", False),  # negative, right
            ("Yes", False),  # negative, wrong
            ("hmm", False),  # negative, unparsed → wrong
            ("no", False),  # negative, right
            ("No.", False),  # negative, right
        ]
    )
    # positives: 2 right of 3 → 0.667; negatives: 3 right of 5 → 0.6
    assert score.positive == AccuracyScore(2 / 3, 2, 3)
    assert score.negative == AccuracyScore(3 / 5, 3, 5)
    # weighted = (2/3 + 3/5) / 2 = (10/15 + 9/15) / 2 = 19/30 = 0.6333
    assert score.weighted == pytest.approx(19 / 30)


# ------------------------------------------------------------------------------------- tables


def test_tables_are_laid_out_like_the_paper() -> None:
    score = caption_scores([("Mochi and Bo", ["Mochi"])], vocabulary=["Bo"])
    # truth 1, mentioned 2, correct 1 → recall 100.00, precision 50.00, F1 = 2·.5·1/1.5 = 66.67
    table = caption_table([("RAP-tiny", score)])
    lines = table.splitlines()
    assert lines[0] == "Personalized captioning (Table 3)"
    assert lines[2].split() == ["Method", "Recall", "Precision", "F1-score"]
    assert lines[4].split() == ["RAP-tiny", "100.00", "50.00", "66.67"]

    qa = QAScore(AccuracyScore(0.5, 1, 2), AccuracyScore(1.0, 1, 1))  # weighted 2/3 = .667
    rec = RecognitionScore(AccuracyScore(1.0, 1, 1), AccuracyScore(0.5, 1, 2))  # (1+.5)/2 = .75
    table = qa_recognition_table([("RAP-tiny", qa, rec), ("captions only", None, None)])
    lines = table.splitlines()
    assert "Table 4" in lines[0]
    assert lines[4].split() == ["RAP-tiny", "0.500", "1.000", "0.667", "1.000", "0.500", "0.750"]
    assert lines[5].split() == ["captions", "only", "-", "-", "-", "-", "-", "-"]
