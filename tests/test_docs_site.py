"""The docs stay true to the code: the architecture page lists every module, and every relative
link in the README reaches a file of the repository."""

from __future__ import annotations

import re

from tests.conftest import REPO

SRC = REPO / "src" / "fedoap"


def test_the_architecture_page_lists_every_module():
    page = (REPO / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", page, re.M))
    modules = {p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")}
    assert modules - listed == set(), "modules missing from docs/architecture.md"
    assert listed - modules == set(), "docs/architecture.md lists modules that do not exist"


def test_the_readme_links_reach_files():
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(targets) >= 10
    broken = [
        t
        for t in targets
        if "://" not in t and not t.startswith("#") and not (REPO / t.split("#")[0]).exists()
    ]
    assert broken == []
