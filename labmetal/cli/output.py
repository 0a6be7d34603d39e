"""The one output rule of `labmetal`: tables for people, JSON for programs (``--json``).

Every command's result goes through ``show``; commands that print lines of their own for
people (a state line, a live view) use ``print_table`` and ``print_fields`` from here, so
that a table looks the same whichever command prints it. Progress and warnings go to
standard error, never into what a program reads.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any


def show(result: Any, as_json: bool, human: Callable[[Any], None] | None) -> None:
    """A command's result: JSON with --json or when the command has no view for people."""
    if result is None:
        return
    if as_json or human is None:
        print_json(result)
    else:
        human(result)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    """Columns as wide as their widest cell, two spaces apart."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        cells = (str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def print_fields(record: Mapping[str, Any], skip: tuple[str, ...] = ("links",)) -> None:
    """One ``key  value`` line per field, the values in one column."""
    width = max((len(key) for key in record), default=0)
    for key, value in record.items():
        if key not in skip:
            print(f"{key.ljust(width)}  {'' if value is None else value}")
