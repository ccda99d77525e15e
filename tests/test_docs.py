"""The docs hold together: every relative link in README.md and docs/*.md names a file that exists,
and the README stays a page a newcomer reads in minutes."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    links = (m.group(1).split("#")[0] for m in LINK.finditer(text))
    return [link for link in links if link and not re.match(r"[a-z]+:", link)]


def test_every_relative_link_resolves():
    broken = [
        f"{page.relative_to(ROOT)}: {link}"
        for page in PAGES
        for link in relative_links(page)
        if not (page.parent / link).exists()
    ]
    assert not broken, broken


def test_readme_is_short_and_keeps_the_two_set_up_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.split()) < 1000, "README.md grew: move details into docs/"
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    assert any("pytest" in block for block in blocks)
    assert any(block.strip().endswith("chat") for block in blocks)


# A repository path as the code map names it: under a top-level folder of this repository.
REPO_PATH = re.compile(
    r"(?<![\w./<-])((?:bots|engine|workers|rapbot|tests|docs|deploy|benchmarks|scripts)/[\w./-]*)"
)


def named_paths(page: Path) -> set[str]:
    """Every repository path the page names, in `code` or in a code block (a placeholder
    such as ``bots/<name>_adapter/`` counts up to its placeholder)."""
    return {m.group(1).rstrip(".") for m in REPO_PATH.finditer(page.read_text())}


def test_the_code_map_names_only_paths_that_exist():
    pages = [ROOT / "docs" / "architecture.md", ROOT / "README.md"]
    named = {(page.name, path) for page in pages for path in named_paths(page)}
    assert len(named) > 20  # the map names the files: a page that names none has lost its map
    missing = sorted(f"{name}: {path}" for name, path in named if not (ROOT / path).exists())
    assert not missing, missing
