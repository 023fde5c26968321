"""Checking one request value of each kind: every failure is one line naming the input and what it allows.

Validation does not rely on Cog's schema: a server started without one passes any JSON value through.
"""

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import InputError
from .limits import MAX_PROMPT_CHARS
from .pictures.read import READABLE_NAMES

JSON_KINDS = {dict: "object", list: "array", bool: "boolean", int: "number", float: "number"}
"""What a request's non-file value was, in JSON's words, for error messages."""

FileCheck = Callable[[str, Any], Path]
"""How an entry point turns a file input into a path it may read: `fetched_file` for the server, `local_file` for
the command line."""


def integer(name: str, value: Any, low: int, high: int) -> int:
    """An int (or an integral float such as 4.0) within [low, high]."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{name}: must be a whole number from {low} to {high}, got {value!r}")
    return value


def number(name: str, value: Any, low: float, high: float) -> float:
    """A finite int or float within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{name}: must be a number from {low:g} to {high:g}, got {value!r}")
    if not low <= value <= high:
        raise InputError(f"{name}: must be from {low:g} to {high:g}, got {value!r}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name}: must be true or false, got {value!r}")
    return value


def text(name: str, value: Any, max_chars: int = MAX_PROMPT_CHARS) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{name}: must be text, got {value!r}")
    if len(value) > max_chars:
        raise InputError(f"{name}: at most {max_chars} characters, got {len(value)}")
    return value.strip()


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    normalised = value.strip().lower() if isinstance(value, str) else value
    if normalised == "jpeg":
        normalised = "jpg"
    if normalised not in allowed:
        raise InputError(f"{name}: must be one of {', '.join(allowed)}, got {value!r}")
    return normalised


def secret(name: str, value: Any) -> str | None:
    """A token given as a Cog Secret (or plain text, from the command line); None when not given."""
    if value is None:
        return None
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    if not isinstance(value, str):
        raise InputError(f"{name}: must be text, got a JSON {JSON_KINDS.get(type(value), type(value).__name__)}")
    return value.strip() or None


def lora_source(name: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{name}: must be text (a URL, a Hugging Face repo or a data URI), got {value!r}")
    return value.strip()


def fetched_file(name: str, value: Any) -> Path:
    """A file Cog fetched for this request, which always lies directly in the temporary folder.

    Cog turns data URIs and http(s) URLs into such files. Anything else (a path on the server, a file://
    URL, a link) is refused before it is opened, so a request can never make the predictor read the
    container's files or the outputs of earlier requests, which lie in a subfolder.
    """
    if value is None:
        raise InputError(f"{name}: required; give a picture file ({READABLE_NAMES})")
    allowed = f"{name}: give a file (an upload, a data URI or an http(s) URL)"
    if isinstance(value, str):
        raise InputError(f"{allowed}; paths and other text are not accepted")
    if not isinstance(value, Path):
        kind = JSON_KINDS.get(type(value), type(value).__name__)
        raise InputError(f"{allowed}, not a JSON {kind}")
    path = Path(value)
    temporary_folder = Path(tempfile.gettempdir()).resolve()
    if path.is_symlink() or not path.is_file() or path.resolve().parent != temporary_folder:
        raise InputError(f"{allowed}, not a path on the server")
    return path


def local_file(name: str, value: Any) -> Path:
    """A file given on the command line: any readable local path (the server takes only files Cog fetched)."""
    if value is None:
        raise InputError(f"{name}: required; give a picture file ({READABLE_NAMES})")
    path = Path(value).expanduser()
    if not path.is_file():
        raise InputError(f"{name}: no such file: {path}")
    return path
