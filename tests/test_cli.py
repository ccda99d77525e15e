"""The `rapbot` CLI contract: options, JSON shapes, exit codes, persistence across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rapbot.cli import main


@pytest.fixture
def cli(tiny_models, tmp_path, monkeypatch, capsys):
    """Run `rapbot ARGS...` in-process on the tiny profile (models built once per session)."""
    import engine.models

    monkeypatch.setattr(engine.models, "load_models", lambda settings: tiny_models[1])
    monkeypatch.setenv("RAPBOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RAPBOT_PROFILE", "tiny")

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse usage errors
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_remember_json_contract(cli, dreambooth) -> None:
    code, out, err = cli(
        "--json", "remember", dreambooth / "cat/00.jpg", "Mochi", "--desc", "my grey cat"
    )
    assert code == 0, err
    concept = json.loads(out)["concept"]
    assert set(concept) == {"id", "name", "description", "category", "box", "examples"}
    assert (concept["name"], concept["description"], concept["category"]) == (
        "Mochi",
        "my grey cat",
        "cat",
    )
    assert len(concept["box"]) == 4 and all(isinstance(v, int) for v in concept["box"])
    assert concept["examples"] == 1
    code, out, _ = cli("remember", dreambooth / "cat/01.jpg", "Mochi", "--json")  # options after
    assert json.loads(out)["concept"]["examples"] == 2


def test_who_and_ask_json_contract(cli, dreambooth, tmp_path) -> None:
    cli("remember", dreambooth / "cat/00.jpg", "Mochi", "--desc", "my grey cat")
    out_file = tmp_path / "named.png"
    code, out, err = cli("--json", "who", dreambooth / "cat/00.jpg", "--out", out_file)
    assert code == 0, err
    payload = json.loads(out)
    assert set(payload) == {"answer", "concepts"}
    assert [set(c) for c in payload["concepts"]] == [{"name", "score", "box"}]
    assert payload["concepts"][0]["name"] == "Mochi" and payload["concepts"][0]["score"] > 0.99
    assert "Mochi (your grey cat)" in payload["answer"]
    assert out_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = cli("--json", "ask", dreambooth / "cat/00.jpg", "is Mochi here?")
    assert json.loads(out)["answer"].startswith("Yes, Mochi")
    code, out, _ = cli("--json", "ask", "what is Mochi?")
    assert json.loads(out) == {
        "answer": "Mochi is your grey cat (1 photo remembered).",
        "concepts": [{"name": "Mochi", "score": 1.0, "box": None}],
    }


def test_concepts_and_management_commands(cli, dreambooth) -> None:
    cli("--user", "alice", "remember", dreambooth / "dog/00.jpg", "Rex", "--desc", "my dog")
    code, out, _ = cli("--json", "concepts")
    assert json.loads(out) == {
        "concepts": [{"name": "Rex", "description": "my dog", "examples": 1, "owner": "alice"}]
    }
    assert cli("--user", "alice", "rename", "Rex", "Rexy") == (0, "Renamed Rex to Rexy.\n", "")
    code, out, _ = cli("--user", "alice", "describe", "Rexy", "the good boy")
    assert code == 0 and out == "Updated: Rexy — the good boy.\n"
    code, out, _ = cli("--json", "concepts")
    assert json.loads(out)["concepts"][0]["description"] == "the good boy"
    code, out, err = cli("--user", "bob", "forget", "Rexy")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Only the person who remembered Rexy" in err
    assert "Traceback" not in err
    code, out, _ = cli("--user", "bob", "--admin", "forget", "Rexy")
    # The chats' wording (bots.core.replies), not a CLI dialect of its own.
    assert code == 0 and out == "I've forgotten Rexy and all photos of them.\n"
    assert json.loads(cli("--json", "concepts")[1]) == {"concepts": []}


def test_chats_are_separate_scopes(cli, dreambooth) -> None:
    cli("--chat", "tg:1", "remember", dreambooth / "cat/00.jpg", "Mochi")
    assert json.loads(cli("--chat", "tg:2", "--json", "concepts")[1]) == {"concepts": []}
    payload = json.loads(cli("--chat", "tg:2", "--json", "who", dreambooth / "cat/00.jpg")[1])
    assert payload["concepts"] == []


@pytest.mark.parametrize(
    "args",
    [
        ("forget", "Nobody"),
        ("remember", "{photos}/cat/00.jpg", "<b>bad</b>"),
        ("remember", "{photos}/cat/00.jpg", "x" * 200),
        ("remember", "{photos}/cat/00.jpg", ""),
        ("who", "/no/such/photo.jpg"),
        ("remember", "{photos}/cat/00.jpg", "Tom", "--box", "5000,5000,6000,6000"),
    ],
)
def test_user_errors_exit_1_with_one_line(cli, dreambooth, args) -> None:
    args = [a.format(photos=dreambooth) for a in args]
    code, out, err = cli(*args)
    assert code == 1
    assert out == ""
    assert err.startswith("rapbot: ") and err.count("\n") == 1
    assert json.loads(cli("--json", "concepts")[1]) == {"concepts": []}


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("frobnicate",),
        ("remember",),
        ("who",),
        ("--profile", "huge", "concepts"),
        ("remember", "a.jpg", "Mochi", "--box", "1,2,3"),
    ],
)
def test_usage_errors_exit_2(cli, args) -> None:
    code, _, err = cli(*args)
    assert code == 2
    assert "usage:" in err


def test_persistence_across_processes(tmp_path, dreambooth) -> None:
    """Real `rapbot` processes: what one remembers, the next recognizes."""
    env = {**os.environ, "RAPBOT_DATA_DIR": str(tmp_path / "data"), "RAPBOT_PROFILE": "tiny"}
    # A first run on a fresh machine: nothing but JSON may reach stdout.
    for name in ("YOLO_CONFIG_DIR", "YOLO_VERBOSE"):
        env.pop(name, None)
    exe = [sys.executable, "-m", "rapbot.cli"]
    cwd = Path(__file__).resolve().parent.parent

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*exe, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
        )

    first = run("--json", "remember", dreambooth / "cat/00.jpg", "Mochi", "--desc", "my grey cat")
    assert first.returncode == 0, first.stderr
    second = run("--json", "who", dreambooth / "cat/00.jpg")
    assert second.returncode == 0, second.stderr
    assert [c["name"] for c in json.loads(second.stdout)["concepts"]] == ["Mochi"]
    bad = run("who", tmp_path)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
