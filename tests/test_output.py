"""The CLI's tables at 80 columns: nothing wider, no word or id broken (#28)."""

from __future__ import annotations

import io
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.text import Text

from gpuprovider.cli import output
from gpuprovider.cli.output import Id, ShortId, table

WIDTH = 80
word = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=9)
# words joined by separators and spaces: model names, reasons, paths
phrase = st.lists(
    st.tuples(word, st.sampled_from(["-", "/", ":", " ", ", ", "_", "."])), max_size=6
).map(lambda parts: "".join(w + s for w, s in parts).strip())
ident = word.map(lambda w: Id("t-" + w))
cell = st.one_of(phrase, ident, st.integers(0, 10**6), st.none())


def rendered(columns, rows, **kwargs) -> str:
    sink = io.StringIO()
    saved = output.console
    output.console = Console(file=sink, width=WIDTH, color_system=None)
    try:
        table("T", columns, rows, **kwargs)
    finally:
        output.console = saved
    return sink.getvalue()


def pieces(text: str, keep_separators: bool = False) -> list[str]:
    """What must never be broken: an id, a word up to and with its separator (the
    separator stays with its word: it counts toward the room the word needs)."""
    if isinstance(text, Id):
        return [text]
    found = [p for p in re.findall(r"[^\s\-/:_,;=.]*[\-/:_,;=.]*", text) if p]
    return found if keep_separators else [p.rstrip("-/:_,;=.") for p in found]


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 8).flatmap(
        lambda n: st.tuples(
            st.lists(
                st.sampled_from(["ID", "NAME", "STATE", "NEW WORK", "REASON"]),
                min_size=n,
                max_size=n,
            ),
            st.lists(st.lists(cell, min_size=n, max_size=n), max_size=5),
        )
    )
)
def test_tables_fit_80_columns_and_break_no_word(shape):
    columns, rows = shape
    text = rendered(columns, rows)
    lines = text.splitlines()
    fits = (
        3 * len(columns)
        - 3
        + sum(
            max(
                [len(c)]
                + [
                    len(p)
                    for row in rows
                    for p in pieces(row[i] if isinstance(row[i], Id) else str(row[i] or "-"), True)
                ]
            )
            for i, c in enumerate(columns)
        )
        <= WIDTH
    )
    if not fits:
        return  # the last resort folds words; only what can fit is promised
    assert all(len(line) <= WIDTH for line in lines), text
    for row in rows:
        for value in row:
            if isinstance(value, Id):
                assert any(value in line for line in lines), (value, text)
            elif value not in (None, ""):
                for piece in pieces(str(value)):
                    assert any(piece in line for line in lines), (piece, text)


def test_an_id_too_long_for_the_width_shows_its_shortest_unique_prefix():
    uuids = [ShortId(f"GPU-{n}a1b2c3d-0000-1111-2222-{n:012d}") for n in range(3)]
    rows = [[u, "h100-80gb-sxm [simulated]", "ok", "reason " * 6] for u in uuids]
    text = rendered(["UUID", "MODEL", "HEALTH", "REASON"], rows)
    assert all(len(line) <= WIDTH for line in text.splitlines())
    for n in range(3):
        assert f"GPU-{n}a1b2c3d " in text and "GPU-0a1b2c3d-0000" not in text
    same_start = [ShortId("GPU-aaaaaaaa-1" + "x" * 30), ShortId("GPU-aaaaaaaa-2" + "x" * 30)]
    text = rendered(["UUID", "REASON"], [[u, "why " * 20] for u in same_start])
    assert "GPU-aaaaaaaa-1 " in text and "GPU-aaaaaaaa-2 " in text


def test_optional_columns_give_way_and_say_so():
    rows = [["vm", "ready; " + "isolation note " * 8, Id("n-" + "a" * 12)]]
    text = rendered(["NAME", "STATUS", "ID"], rows, optional=["ID"])
    assert "n-aaaa" not in text and "(ID left out at this width" in text
    narrow = rendered(["NAME", "STATUS", "ID"], [["vm", "ready", Id("n-1")]], optional=["ID"])
    assert "n-1" in narrow and "left out" not in narrow


@pytest.mark.parametrize("style", ["bold red", ""])
def test_a_styled_cell_keeps_its_text(style):
    assert "FAIL" in rendered(["STATUS"], [[Text("FAIL", style=style)]])
