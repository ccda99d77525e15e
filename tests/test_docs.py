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
