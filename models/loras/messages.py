"""Text from outside (URLs, archive member names, repo listings) made safe for one-line messages and logs."""

import re
import urllib.parse

from .. import limits
from ..errors import InputError

MAX_LISTED_NAMES = 8
"""File names shown in an error that lists candidates."""


def redact(url: str) -> str:
    """scheme://host[:port]/path of a URL, without user info, query or fragment, which can carry credentials."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def one_line(text: str, limit: int = 200) -> str:
    """Text from outside (archive member names, repo listings) made safe for a one-line message."""
    return re.sub(r"[\x00-\x1f\x7f]", "?", text)[:limit]


def listed(names: list[str]) -> str:
    shown = ", ".join(one_line(name) for name in names[:MAX_LISTED_NAMES])
    more = len(names) - MAX_LISTED_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def human_size(count: int) -> str:
    value, unit = float(count), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{count} bytes" if unit == "bytes" else f"{value:.1f}".removesuffix(".0") + f" {unit}"


def too_large(name: str, size: int | None = None) -> InputError:
    limit = f"the {human_size(limits.MAX_LORA_BYTES)} limit for LoRA files"
    if size is None:
        return InputError(f"{name}: the file is larger than {limit}")
    return InputError(f"{name}: the file is {human_size(size)}, more than {limit}")
