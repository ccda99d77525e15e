"""The `rapbot` CLI contract: options, JSON shapes, exit codes, persistence across processes."""

from __future__ import annotations

import json
import os
import re
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
        ("remember", "a.jpg", "Mochi", "--box", "inf,0,1,1"),
        ("remember", "a.jpg", "Mochi", "--box", "nan,0,1,1"),
        ("remember", "a.jpg", "Mochi", "--box", "50,0,10,10"),
        ("ask", "is", "Rex", "here"),  # the question not in quotes
        ("search",),
        ("index",),
    ],
)
def test_usage_errors_exit_2(cli, args) -> None:
    code, _, err = cli(*args)
    assert code == 2
    assert "usage:" in err and "Traceback" not in err


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


def test_index_names_the_bad_files_and_indexes_the_good_ones(cli, dreambooth, tmp_path) -> None:
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_text("not a photo")
    good = [dreambooth / "cat/00.jpg", dreambooth / "dog/00.jpg"]
    code, out, err = cli("--json", "index", good[0], not_a_photo, tmp_path / "gone.jpg", good[1])
    assert code == 1
    payload = json.loads(out)
    assert [p["source"] for p in payload["indexed"]] == [str(p.resolve()) for p in good]
    assert [f["source"] for f in payload["failed"]] == [
        str(not_a_photo),
        str(tmp_path / "gone.jpg"),
    ]
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "notes.jpg" in lines[0] and "gone.jpg" in lines[1]
    assert "Traceback" not in err


# Runs `rapbot ARGS` in a fresh interpreter where the model libraries cannot be imported: a
# command that needs none of them works; one that reaches for them fails with ImportError.
MODEL_LIBRARIES = ("torch", "open_clip", "ultralytics", "transformers")
WITHOUT_MODELS = f"""
import importlib.abc, runpy, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {MODEL_LIBRARIES!r}:
            raise ImportError(f"{{name}} is blocked: this command must not need it")

sys.meta_path.insert(0, Blocked())
sys.argv = ["rapbot", *sys.argv[1:]]
runpy.run_module("rapbot.cli", run_name="__main__")
"""
ROOT = Path(__file__).resolve().parent.parent


def run_without_models(*args, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_MODELS, *map(str, args)],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_store_only_commands_need_no_model_and_no_weights(cli, dreambooth, tmp_path) -> None:
    """Listing, editing, exporting and deleting a user's data (a privacy request) on the
    store alone: no model library imported, and the configured profile's CLIP weights (the
    cpu profile's, not downloadable here) are never needed."""
    cli("--user", "alice", "remember", dreambooth / "dog/00.jpg", "Rex", "--desc", "my dog")
    cli("--user", "alice", "remember", dreambooth / "cat/00.jpg", "Mochi")
    weights_missing = {"RAPBOT_PROFILE": "cpu"}

    def run(*args):
        done = run_without_models(*args, **weights_missing)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert [c["name"] for c in json.loads(run("--json", "concepts"))["concepts"]] == [
        "Mochi",
        "Rex",
    ]
    assert run("--user", "alice", "rename", "Rex", "Rexy") == "Renamed Rex to Rexy.\n"
    assert run("--user", "alice", "describe", "Rexy", "the good boy").startswith("Updated: Rexy")
    assert "Exported 2 concept(s)" in run("export", "--out", tmp_path / "backup.zip")
    # An archive of the store's own model is imported without embedding anything again.
    assert "Imported 2 new concept(s)" in run("--chat", "cli:2", "import", tmp_path / "backup.zip")
    assert run("--user", "alice", "forget", "Mochi").startswith("I've forgotten Mochi")
    forgotten = json.loads(run("--json", "forget-user", "alice"))
    assert forgotten == {"forgotten": 3, "files_deleted": 0}  # both chats; no adapter files
    assert json.loads(run("--json", "concepts")) == {"concepts": []}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("remember", "{cat}", "<b>bad</b>"), "Names"),
        (("remember", "{cat}", "Tom", "--desc", "x" * 5000), "Descriptions"),
        (("remember", "{text}", "Tom"), "notes.txt"),
        (("who", "{text}"), "notes.txt"),
        (("who", "{cat}", "--out", "{tmp}/missing/named.jpg"), "does not exist"),
        (("ask", "{cat}", "who is this?", "--out", "{tmp}"), "is a folder"),
    ],
)
def test_bad_input_is_one_line_before_any_model_loads(dreambooth, tmp_path, args, expected) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    values = {"cat": dreambooth / "cat/00.jpg", "text": text, "tmp": tmp_path}
    done = run_without_models(
        *(a.format(**values) for a in args), RAPBOT_DATA_DIR=str(tmp_path / "data")
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("rapbot: ") and expected in done.stderr


def test_serve_with_a_malformed_token_fails_before_loading_models(tmp_path) -> None:
    done = run_without_models(
        "serve", "telegram", TELEGRAM_BOT_TOKEN="123:abc", RAPBOT_DATA_DIR=str(tmp_path)
    )
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.splitlines()
    assert "TELEGRAM_BOT_TOKEN does not look like a telegram token" in line


@pytest.mark.parametrize("args", [("--help",), ("concepts",), ("who", "--help")])
def test_start_up_imports_no_model_library(tmp_path, args) -> None:
    """`python -X importtime`: what `rapbot --help` and `rapbot concepts` import."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rapbot.cli", *args],
        env={**os.environ, "RAPBOT_DATA_DIR": str(tmp_path)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {
        line.split("|")[-1].strip() for line in done.stderr.splitlines() if "import time:" in line
    }
    assert imported and not imported & set(MODEL_LIBRARIES), imported & set(MODEL_LIBRARIES)


def test_every_command_help_says_what_it_prints_with_an_example() -> None:
    from rapbot.cli import build_parser
    from rapbot.cli.guide import commands

    helps = {words: child.format_help() for words, child, _ in commands(build_parser())}
    assert {"remember", "concepts", "forget-user", "eval cir", "train rap", "chat"} <= set(helps)
    for words, text in helps.items():
        lowered = text.lower()
        assert "print" in lowered and "example" in lowered, f"rapbot {words} --help:\n{text}"
    assert "Recall@1" in helps["eval cir"] and "mAP@" in helps["eval cir"]  # names its metrics


def test_chat_saves_annotated_photos_under_the_data_folder(
    cli, dreambooth, tmp_path, monkeypatch
) -> None:
    import io

    cat = dreambooth / "cat/00.jpg"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/remember Mochi < {cat}\n/who < {cat}\n"))
    code, out, err = cli("chat")
    assert code == 0, err
    saved = list((tmp_path / "data" / "chat-photos").glob("*.jpg"))
    assert len(saved) == 1 and str(saved[0]) in out
    assert not list(tmp_path.glob("*.jpg"))  # nothing in the current folder


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_export_and_import_show_progress_with_counts_on_a_terminal(
    cli, dreambooth, tmp_path, monkeypatch
) -> None:
    """On a terminal, export and import draw a bar on stderr with done/total counts and an
    ETA; --json output stays one clean JSON document (no bar)."""
    import rapbot.cli.common

    cli("remember", dreambooth / "cat/00.jpg", "Mochi")
    cli("remember", dreambooth / "dog/00.jpg", "Rex")
    cli("index", dreambooth / "cat/01.jpg", dreambooth / "dog/01.jpg")
    monkeypatch.setattr(rapbot.cli.common, "stderr_is_terminal", lambda: True)
    code, out, err = cli("export", "--out", tmp_path / "chat.zip")
    assert code == 0 and "Exported 2 concept(s)" in out
    shown = ANSI.sub("", err)
    assert "Exporting" in shown and "4/4" in shown and "ETA" in shown  # 2 crops, 2 photos
    code, out, err = cli("--chat", "cli:2", "import", tmp_path / "chat.zip", "--with-photos")
    assert code == 0, err
    shown = ANSI.sub("", err)
    assert "Importing" in shown and "4/4" in shown
    code, out, err = cli("--json", "export", "--out", tmp_path / "again.zip")
    assert code == 0 and err == ""
    assert json.loads(out)["exported"]["photos"] == 2


def test_forget_user_deletes_the_web_chats_kept_photos_of_that_user(cli, tmp_path) -> None:
    """The web chat keeps the photos it indexed under <data>/web/<name>/photos: forget-user
    web:<name> deletes them with the stores' data, and nobody else's; a name that is no web
    chat's ("..") deletes nothing."""
    import io

    from PIL import Image

    from bots.web_adapter.files import PhotoFolder, photos_dir, source_of

    data = tmp_path / "data"  # the cli fixture's RAPBOT_DATA_DIR
    photo = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(photo, format="JPEG")
    for name in ("ada", "bob"):
        PhotoFolder(photos_dir(data, name)).keep(source_of(photo.getvalue()), photo.getvalue())
    code, out, err = cli("--json", "forget-user", "web:ada")
    assert code == 0, err
    assert json.loads(out)["files_deleted"] == 1
    assert not photos_dir(data, "ada").exists()
    assert len(list(photos_dir(data, "bob").iterdir())) == 1
    code, out, _ = cli("forget-user", "web:bob")
    assert code == 0 and "Deleted the 1 photo file kept for them on disk." in out
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for outside in ("web:..", "web:.", "web:../photos", "tg:42"):
        code, out, err = cli("--json", "forget-user", outside)
        assert code == 0 and json.loads(out)["files_deleted"] == 0, err
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_forget_user_says_which_kept_folder_it_could_not_delete(cli, tmp_path, monkeypatch) -> None:
    """A kept folder that cannot be deleted (permissions, a mount) is one line naming it, not
    a traceback after the stores were cleared."""
    import io
    import shutil

    from PIL import Image

    from bots.web_adapter.files import PhotoFolder, photos_dir, source_of

    photo = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(photo, format="JPEG")
    folder = photos_dir(tmp_path / "data", "ada")
    PhotoFolder(folder).keep(source_of(photo.getvalue()), photo.getvalue())

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    code, _, err = cli("forget-user", "web:ada")
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"rapbot: Could not delete {folder} (Permission denied); delete it by hand."
    ]
