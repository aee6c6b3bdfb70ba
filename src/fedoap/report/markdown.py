"""Names as literal markdown text, and markdown tables.

Names read from the results (methods, variants, clients, regimes, devices) reach REPORT.md
through :func:`md`: whatever they hold, they show as the text they are and never end a table
cell, start emphasis, code, a link or math, or inject HTML.
"""

from __future__ import annotations

import re
from typing import Any

#: What :func:`md` escapes: runs of ``_``, markdown's active characters and control characters.
_MD_ACTIVE = re.compile(r"_+|[\\`*\[\]|~$&<>]|[\x00-\x1f\x7f]")
_MD_ENTITY = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _md_escape(m: re.Match[str]) -> str:
    s, text, a, b = m.string, m.group(), m.start(), m.end()
    if text[0] == "_":
        # Between two letters or digits (``fedavg_ft``) an underscore never starts or ends
        # emphasis, so ordinary names read back unchanged; elsewhere (``_x_``) it could.
        inside = a > 0 and b < len(s) and s[a - 1].isalnum() and s[b].isalnum()
        return text if inside else text.replace("_", r"\_")
    if text in _MD_ENTITY:
        return _MD_ENTITY[text]  # an entity is inert in every renderer, not only CommonMark
    if ord(text) < 0x20 or text == "\x7f":
        return f"&#{ord(text)};"  # a newline would end a table row
    return "\\" + text


def md(name: Any) -> str:
    """``name`` as literal markdown text, also in a table cell.

    ``& < >`` become entities (raw HTML is inert), ``| * _ ` [ ] ~ $ \\`` are backslash-escaped
    (no table cell ends, no emphasis, code, link or math starts), and control characters become
    numeric references (a newline does not end the row). Letters, digits, ``. - + : ( ) @``,
    spaces and an underscore between letters (``fedavg_ft``) are left as they are, so ordinary
    names read the same. Distinct names stay distinct.
    """
    return _MD_ACTIVE.sub(_md_escape, str(name))


def md_code(name: str) -> str:
    """``name`` as inline code where it is a plain word (letters, digits, ``. _ + -``), which
    code shows as it is; anything else as :func:`md` text, since inside code an escape would
    show."""
    return f"`{name}`" if re.fullmatch(r"[\w.+-]+", name, re.ASCII) else md(name)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured markdown table, one line per row."""
    lines = ["| " + " | ".join(cells) + " |" for cells in (header, *rows)]
    return [lines[0], "|" + "---|" * len(header), *lines[1:]]


def text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """:func:`markdown_table` of cells that are plain text, each written through :func:`md`: the
    tables that are also drawn as figures, which show the same cells as they are."""
    return markdown_table([md(h) for h in header], [[md(c) for c in row] for row in rows])
