"""Rendering for the CLI: Rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console()
errors = Console(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def ago(ts: float | None) -> str:
    if not ts:
        return "-"
    seconds = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


class Id(str):
    """An id a person copies: never broken across lines."""


class ShortId(Id):
    """An id the commands that take it accept by a prefix: where its column must be
    narrow it shows its shortest prefix unique in the column (at least `ID_PREFIX`
    characters)."""


class Words(str):
    """Text broken only at spaces (a list of ids in a cell)."""


ID_PREFIX = 12
# Where a cell may break when its column is narrow: after whitespace or a separator
# (`h100-80gb-` / `sxm`), never inside a word or a number.
_PIECE = re.compile(r"\s+|[^\s\-/:_,;=.]*[\-/:_,;=.]+|[^\s\-/:_,;=.]+")
_WORD = re.compile(r"\s+|\S+")


def _pieces(text: str) -> list[str]:
    """`text` cut where a line may break (whitespace pieces included)."""
    if isinstance(text, Id):
        return [text]
    return (_WORD if isinstance(text, Words) else _PIECE).findall(text)


def _unbreakable(text: str) -> list[str]:
    return [piece for piece in _pieces(text) if not piece.isspace()]


def wrap(text: str, width: int) -> str:
    """`text` in lines of at most `width`, broken where `_pieces` allows (a piece
    longer than the line is folded: the last resort)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for piece in _pieces(type(text)(paragraph)):
            if piece.isspace():
                line += " " if line and not line.endswith(" ") else ""
                continue
            if line.strip() and len(line) + len(piece) > width:
                lines.append(line.rstrip())
                line = ""
            line += piece
            while len(line) > width:
                lines.append(line[:width])
                line = line[width:]
        lines.append(line.rstrip())
    return "\n".join(lines)


def _shortened(ids: list[str]) -> list[ShortId]:
    """Each id as its shortest prefix of at least ID_PREFIX characters that no other
    id in the column shares."""
    out = []
    for value in ids:
        n = ID_PREFIX
        while n < len(value) and any(o != value and o.startswith(value[:n]) for o in ids):
            n += 1
        out.append(ShortId(value[:n]))
    return out


def _widths(natural: list[int], least: list[int], headers: list[int], room: int) -> list[int]:
    """Column widths within `room`: the widest column gives way first (short ones stay
    whole), none below its header's length or its longest unbreakable piece while
    that is enough, then below the header, then folding words (the last resort)."""
    floors = ([max(pair) for pair in zip(least, headers, strict=True)], least, [1] * len(natural))
    widths = list(natural)
    for floor in floors:
        while sum(widths) > room:
            shrinkable = [i for i, w in enumerate(widths) if w > floor[i]]
            if not shrinkable:
                break
            widths[max(shrinkable, key=lambda i: widths[i])] -= 1
    return widths


def _text(cell: Any) -> str:
    if cell is None or cell == "" or cell == []:
        return "-"
    if isinstance(cell, list):  # ids: each whole
        return Words(", ".join(cell))
    if isinstance(cell, Text):
        return cell.plain
    return cell if isinstance(cell, str) else str(cell)


def table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    optional: Sequence[str] = (),
) -> None:
    """Rows under `columns`, fitted to the terminal's width (each column no narrower
    than its header's longest word and its longest unbreakable piece), cells broken
    only at spaces and separators, `Id` cells never (`ShortId` cells shortened).
    A `Text` cell keeps its style. Columns named in `optional` are left out, last
    first, while the table cannot fit without breaking a cell, and a line under it
    says so."""
    names = list(columns)
    cells = [[_text(cell) for cell in row] for row in rows]
    styles = [[cell.style if isinstance(cell, Text) else "" for cell in row] for row in rows]

    def longest(i: int, measure: Callable[[str], list[str]]) -> int:
        return max([0] + [len(piece) for row in cells for piece in measure(row[i])])

    def room() -> int:
        return console.width - (3 * len(names) - 3)  # " │ " between columns

    def least() -> list[int]:
        return [
            max(max(map(len, c.split())), longest(i, _unbreakable)) for i, c in enumerate(names)
        ]

    natural = [max(len(c), longest(i, str.splitlines)) for i, c in enumerate(names)]
    if sum(natural) > room():
        for i, column in enumerate(names):
            ids = [row[i] for row in cells if isinstance(row[i], ShortId)]
            shorts = iter(_shortened(ids))
            for row in cells:
                row[i] = next(shorts) if isinstance(row[i], ShortId) else row[i]
            natural[i] = max(len(column), longest(i, str.splitlines))
    left_out: list[str] = []  # what does not fit without breaking a cell
    for name in reversed(optional):
        if sum(natural) <= room():
            break
        i = names.index(name)
        left_out.insert(0, names.pop(i))
        natural.pop(i)
        for row in cells:
            row.pop(i)
        for style_row in styles:
            style_row.pop(i)
    widths = _widths(natural, least(), [len(name) for name in names], room())
    grid = Table(
        title=title, title_justify="left", show_edge=False, pad_edge=False, header_style="bold"
    )
    for column, width in zip(names, widths, strict=True):
        grid.add_column(wrap(Words(column), width), width=width, overflow="fold")
    for row, style in zip(cells, styles, strict=True):
        grid.add_row(
            *(Text(wrap(c, w), style=s) for c, w, s in zip(row, widths, style, strict=True))
        )
    console.print(grid)
    if left_out:
        console.print(
            f"({', '.join(left_out)} left out at this width: --json shows every field)",
            markup=False,
            style="dim",
        )
