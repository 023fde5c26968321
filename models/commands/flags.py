"""Flags made from a table of inputs, shared by the command lines of the editor and the trainer."""

import argparse
from pathlib import Path
from typing import Any

from ..inputs import REQUIRED, Input


def number_or_text(text: str) -> Any:
    """A flag's value as the JSON a Cog request would carry: a number when it reads as one, else the text, so that the
    entry point's own validation judges it (and says the same thing)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def add_flag(group: argparse._ArgumentGroup, spec: Input, aliases: tuple[str, ...] = ()) -> None:
    """One input as a flag of the same name with dashes (and any shorter aliases)."""
    flags = (*aliases, "--" + spec.name.replace("_", "-"))
    help_text = spec.description.replace("%", "%%")
    if spec.kind == "file":
        group.add_argument(*flags, dest=spec.name, required=spec.default is REQUIRED, type=Path, help=help_text)
    elif spec.kind == "boolean" and spec.default:
        group.add_argument(*flags, dest=spec.name, action=argparse.BooleanOptionalAction, default=True, help=help_text)
    elif spec.kind == "boolean":
        group.add_argument(*flags, dest=spec.name, action="store_true", help=help_text)
    elif spec.kind in ("integer", "number"):
        group.add_argument(*flags, dest=spec.name, type=number_or_text, default=spec.default, help=help_text)
    else:
        group.add_argument(*flags, dest=spec.name, default=spec.default, help=help_text)
