"""Console output for every verb: whole lines when stdout is not a terminal, the terminal's width when it is.

rich wraps at 80 columns (or $COLUMNS) whenever it is not writing to a terminal, which breaks every line a log, CI
or a script reads. Here a console not attached to a terminal has no width limit: each line comes out whole, tables
at their natural width. On a terminal rich's own width applies (the terminal's, or $COLUMNS when set) and table
cells fold instead of being cut with an ellipsis, so no figure is lost at 80 columns.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from rich.console import Console, ConsoleDimensions
from rich.table import Table
from rich.text import Text

from .errors import UserError

UNLIMITED = 100_000  # columns for a console that is not a terminal: wider than any line we print


class WholeLineConsole(Console):
    """A rich Console that never wraps or truncates when its file is not a terminal (checked at each print)."""

    @property
    def size(self) -> ConsoleDimensions:
        if self.is_terminal:
            return super().size
        return ConsoleDimensions(UNLIMITED, super().size.height)

    @size.setter
    def size(self, new_size) -> None:  # rich's own setter, kept working
        Console.size.fset(self, new_size)


def make_console(stderr: bool = False) -> Console:
    # markup off: paths and messages are printed as they are ("[...]" in a path is not a style)
    return WholeLineConsole(stderr=stderr, highlight=False, markup=False, emoji=False)


console = make_console()
err = make_console(stderr=True)


class _Table(Table):
    """A rich Table whose title is a line of its own above it: rich wraps a title to the table's width."""

    heading: str | None = None

    def __rich_console__(self, console, options):
        if self.heading:
            yield Text(self.heading, style="italic")
        yield from super().__rich_console__(console, options)


def table(*columns: str, title: str | None = None) -> Table:
    """A table whose cells fold on a narrow terminal rather than being cut short, its title one whole line."""
    t = _Table()
    t.heading = title
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def is_stdout(path: Path | str | None) -> bool:
    """`--json -` means standard output (the usual convention)."""
    return path is not None and str(path) == "-"


def out_for(json_path: Path | str | None) -> Console:
    """Where a verb's human-readable output goes: stderr when its JSON takes standard output."""
    return err if is_stdout(json_path) else console


@contextlib.contextmanager
def writing(path: Path):
    """An output file named on the command line that cannot be written is a UserError, not a traceback."""
    try:
        yield
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None


def write_json(path: Path | str, obj) -> None:
    """Write obj as JSON to the file `path`, or to standard output when path is `-`."""
    text = json.dumps(obj, indent=1) + "\n"
    if is_stdout(path):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with writing(Path(path)):
        Path(path).write_text(text)
