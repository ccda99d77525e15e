"""Names, descriptions, categories and command parsing: the rules users meet first."""

from __future__ import annotations

import pytest

from bots.core import commands as c
from bots.core.commands import CommandError, parse_command
from engine.categories import category_from_text, same_category
from engine.errors import InvalidInputError
from engine.validation import clean_description, clean_name, clean_scope, names_in_text

VOCAB = ["person", "cat", "dog", "teddy bear", "plush toy", "toy", "backpack", "sneaker"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Mochi", "Mochi"),
        ("  Bo   the  corgi ", "Bo the corgi"),
        ("Zoë", "Zoë"),
        ("O'Neil", "O'Neil"),
        ("R2-D2", "R2-D2"),
        ("小猫", "小猫"),
    ],
)
def test_clean_name_accepts_ordinary_names(raw: str, expected: str) -> None:
    assert clean_name(raw) == expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("", "can't be empty"),
        ("   ", "can't be empty"),
        ("x" * 200, "at most 64 characters"),
        ("<b>Mochi</b>", "'<'"),
        ("Mochi*", "'*'"),
        ("[Mochi](http://x)", "'('"),
        ("@everyone", "'@'"),
        ("---", "at least one letter"),
    ],
)
def test_clean_name_refuses_bad_names_with_a_reason(raw: str, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        clean_name(raw)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_description_is_cleaned_and_bounded() -> None:
    assert clean_description("my\tgrey\x00 cat \n") == "my grey cat"
    with pytest.raises(InvalidInputError, match="at most 300"):
        clean_description("a" * 301)


def test_scope_must_be_printable_and_short() -> None:
    assert clean_scope(" tg:-100123 ") == "tg:-100123"
    for bad in ["", "x" * 200, "tg:\n1"]:
        with pytest.raises(InvalidInputError):
            clean_scope(bad)


def test_names_in_text_whole_words_case_insensitive_in_order() -> None:
    names = ["Mochi", "Bo", "Mochi Jr"]
    assert names_in_text("is bo next to MOCHI?", names) == ["Bo", "Mochi"]
    assert names_in_text("where is Mochi Jr", names) == ["Mochi Jr"]
    assert names_in_text("a boat and mochis", names) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("my grey cat", "cat"),
        ("Alice's corgi", "dog"),
        ("a cat toy", "toy"),
        ("my little sister", "person"),
        ("the kitten", "cat"),
        ("old teddy bear", "teddy bear"),
        ("my favourite sneakers", "sneaker"),
        ("something else entirely", ""),
    ],
)
def test_category_from_text_picks_the_head_noun(text: str, expected: str) -> None:
    assert category_from_text(text, VOCAB) == expected


def test_same_category_knows_synonyms() -> None:
    assert same_category("cat", "kitten")
    assert same_category("teddy bear", "plush toy")
    assert not same_category("cat", "dog")
    assert not same_category("", "cat")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/remember Mochi | my grey cat", c.Remember("Mochi", "my grey cat")),
        ("/remember@rapbot_bot Bo the Corgi", c.Remember("Bo the Corgi", "")),
        ("/who", c.Who()),
        ("/WHO@rapbot", c.Who()),
        ("/ask is Mochi here?", c.Ask("is Mochi here?")),
        ("/rename Mochi | Mochi Senior", c.Rename("Mochi", "Mochi Senior")),
        ("/describe Mochi | the fluffy one", c.Describe("Mochi", "the fluffy one")),
        ("/forget Mochi", c.Forget("Mochi")),
        ("/forget_me", c.ForgetMe()),
        ("/forget-me", c.ForgetMe()),
        ("/index ON", c.Index(True)),
        ("/search Mochi on the sofa", c.Search("Mochi on the sofa")),
        ("/concepts", c.Concepts()),
        ("/help", c.Help()),
    ],
)
def test_parse_command(text: str, expected: c.Command) -> None:
    assert parse_command(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("/remember", "Usage: /remember"),
        ("/remember  | desc", "Usage: /remember"),
        ("/rename Mochi", "Usage: /rename"),
        ("/rename | x", "Usage: /rename"),
        ("/ask", "Usage: /ask"),
        ("/index maybe", "Usage: /index"),
        ("/frobnicate", "/help"),
        ("hello", "start with '/'"),
    ],
)
def test_malformed_commands_explain_their_usage(text: str, fragment: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_command(text)
    assert fragment in str(info.value)
