"""MkDocs hooks: put benchmark reports on their study pages and serve the repository files the
docs link to, so that ``mkdocs build --strict`` checks every link.

* A line ``<!-- include: PATH -->`` (PATH relative to the repository root) is replaced by that
  markdown file: its title (a first ``#`` heading) dropped, every other heading one level lower,
  its relative links rewritten to point where they pointed from the file's own folder.
* A link from a page to a file of the repository outside ``docs/`` (source, configs, figures,
  csv files) is served as a copy under ``repo/`` in the site; a link to a markdown file that a
  page includes goes to that page. A link to a file that does not exist, to a folder, or to a
  markdown file no page includes is a warning, which ``--strict`` makes an error.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.docs_hooks")

REPO = Path(__file__).resolve().parent
DOCS = REPO / "docs"
PREFIX = "repo"
INCLUDE = re.compile(r"^<!-- include: (?P<path>\S+) -->[ \t]*$", re.M)
LINK = re.compile(r"(?P<head>!?\[[^\]\n]*\]\()(?P<target>[^)\s]+)(?P<tail>\))")
HEADING = re.compile(r"^(#{1,5}) ", re.M)


def _outside_code(text: str, fn) -> str:
    """Apply ``fn`` to the parts of ``text`` outside fenced code blocks."""
    parts = re.split(r"(^(?:```|~~~).*?^(?:```|~~~)[^\n]*$)", text, flags=re.M | re.S)
    return "".join(p if i % 2 else fn(p) for i, p in enumerate(parts))


def _external(target: str) -> bool:
    return "://" in target or target.startswith(("#", "mailto:", "/"))


def _rebase(text: str, from_dir: str, to_dir: str) -> str:
    """Rewrite relative links written from repository folder ``from_dir`` as seen from
    ``to_dir`` (both relative to the repository root)."""

    def one(m: re.Match[str]) -> str:
        target = m["target"]
        if _external(target):
            return m.group(0)
        path, sep, anchor = target.partition("#")
        moved = posixpath.relpath(posixpath.normpath(posixpath.join(from_dir, path)), to_dir)
        return f"{m['head']}{moved}{sep}{anchor}{m['tail']}"

    return _outside_code(text, lambda part: LINK.sub(one, part))


def _included(rel: str, page_dir: str, where: str) -> str:
    source = REPO / rel
    if not source.is_file():
        log.warning("%s: include of '%s': no such file", where, rel)
        return ""
    text = source.read_text(encoding="utf-8")
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        text = "\n".join(lines[1:])
    text = _outside_code(text, lambda part: HEADING.sub(r"#\1 ", part))
    return _rebase(text, posixpath.dirname(rel), page_dir)


def _expand(markdown: str, src_uri: str) -> str:
    page_dir = posixpath.join("docs", posixpath.dirname(src_uri))
    return INCLUDE.sub(lambda m: _included(m["path"], page_dir, src_uri), markdown)


def _repo_targets(markdown: str, src_uri: str):
    """(match, path relative to the repository root) for each link leaving ``docs/``."""
    page_dir = posixpath.join("docs", posixpath.dirname(src_uri))
    found = []

    def collect(part: str) -> str:
        for m in LINK.finditer(part):
            target = m["target"]
            if _external(target):
                continue
            path = posixpath.normpath(posixpath.join(page_dir, target.partition("#")[0]))
            if not (path == "docs" or path.startswith("docs/")):
                found.append((m, path))
        return part

    _outside_code(markdown, collect)
    return found


INCLUDED: dict[str, str] = {}  # an included file -> the page (src_uri) that includes it


def on_files(files: Files, config) -> Files:
    INCLUDED.clear()
    for page in list(files.documentation_pages()):
        for m in INCLUDE.finditer(Path(page.abs_src_path).read_text(encoding="utf-8")):
            INCLUDED.setdefault(m["path"], page.src_uri)
    for page in list(files.documentation_pages()):
        markdown = _expand(Path(page.abs_src_path).read_text(encoding="utf-8"), page.src_uri)
        for _, rel in _repo_targets(markdown, page.src_uri):
            source = REPO / rel
            if rel.startswith("..") or not source.is_file():
                log.warning(
                    "%s: link to '%s', which is not a file of the repository", page.src_uri, rel
                )
            elif rel.endswith(".md") and rel not in INCLUDED:
                log.warning(
                    "%s: link to the markdown file '%s' outside docs/: include it on a "
                    "page (<!-- include: %s -->) instead",
                    page.src_uri,
                    rel,
                    rel,
                )
            elif not rel.endswith(".md") and files.get_file_from_path(f"{PREFIX}/{rel}") is None:
                files.append(File.generated(config, f"{PREFIX}/{rel}", abs_src_path=str(source)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    src_uri = page.file.src_uri
    markdown = _expand(markdown, src_uri)
    page_dir = posixpath.join("docs", posixpath.dirname(src_uri))

    def one(m: re.Match[str]) -> str:
        target = m["target"]
        if _external(target):
            return m.group(0)
        path, sep, anchor = target.partition("#")
        rel = posixpath.normpath(posixpath.join(page_dir, path))
        if rel == "docs" or rel.startswith("docs/"):
            return m.group(0)
        where = INCLUDED.get(rel, f"{PREFIX}/{rel}")
        served = posixpath.relpath(f"docs/{where}", page_dir)
        return f"{m['head']}{served}{sep}{anchor}{m['tail']}"

    return _outside_code(markdown, lambda part: LINK.sub(one, part))
