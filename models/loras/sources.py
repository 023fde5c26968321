"""What a LoRA source text names: an http(s) URL, a Hugging Face repo or file, a data URI, or (command line only) a
local file; anything else is refused in one line before any network use.

A source is `lora_weights` or `extra_lora`: an http(s) URL of a safetensors file or of a Replicate training's .tar,
a Hugging Face repo (`owner/repo` or `owner/repo/path/file.safetensors`), or a data URI.
"""

import base64
import binascii
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from .. import limits
from ..errors import InputError
from .messages import one_line, redact, too_large

DEFAULT_PORTS = {"http": 80, "https": 443}
ALLOWED_SOURCES = (
    "give an http(s) URL, a Hugging Face repo (owner/repo or owner/repo/path/file.safetensors) or a data URI"
)
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
WINDOWS_PATH = re.compile(r"[A-Za-z]:[\\/]")
LOCAL_PATH_STARTS = ("/", "./", "../", "~", "\\", ".\\", "..\\")
HF_SOURCE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_-]*)/([A-Za-z0-9][A-Za-z0-9_.-]*)(?:/(.+))?")
HF_PATH_SEGMENT = re.compile(r"[^/\\\x00-\x1f\x7f]+")
CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class UrlSource:
    url: str

    @property
    def description(self) -> str:
        return redact(self.url)


@dataclass(frozen=True)
class HuggingFaceSource:
    repo: str
    """owner/name"""
    file: str | None
    """The file's path in the repo; None: the repo's single .safetensors file."""

    @property
    def description(self) -> str:
        return f"Hugging Face {self.repo}" + (f"/{self.file}" if self.file else "")


@dataclass(frozen=True)
class DataSource:
    uri: str

    @property
    def description(self) -> str:
        return "a data URI"


@dataclass(frozen=True)
class LocalFile:
    """A file on this machine, accepted only with allow_paths (a command-line tool, never a request)."""

    path: Path

    @property
    def description(self) -> str:
        return str(self.path)


LoraSource = UrlSource | HuggingFaceSource | DataSource | LocalFile


def parse_source(name: str, text: str, *, allow_paths: bool = False) -> LoraSource | None:
    """What a LoRA source text names; None for empty text; an InputError for anything that is not fetched.

    With allow_paths an existing local file wins over the other readings (so `loras/x.safetensors` is that file).
    """
    text = text.strip()
    if not text:
        return None
    if allow_paths and (path := existing_file(text)) is not None:
        return LocalFile(path)
    if text.startswith(LOCAL_PATH_STARTS) or WINDOWS_PATH.match(text) or text in (".", ".."):
        if allow_paths:
            raise InputError(f"{name}: no such file {one_line(text)}")
        raise InputError(f"{name}: local paths are not accepted; {ALLOWED_SOURCES}")
    if scheme_match := SCHEME.match(text):
        scheme = scheme_match.group(1).lower()
        if scheme in DEFAULT_PORTS:
            if problem := url_problem(text):
                raise InputError(f"{name}: {problem}; {ALLOWED_SOURCES}")
            return UrlSource(text)
        if scheme == "data":
            return DataSource(text)
        if scheme == "file":
            raise InputError(f"{name}: file:// URLs are not accepted; {ALLOWED_SOURCES}")
        raise InputError(f"{name}: {scheme[:20]}: sources are not supported; {ALLOWED_SOURCES}")
    if match := HF_SOURCE.fullmatch(text):
        return hugging_face_source(name, match.group(1), match.group(2), match.group(3))
    if ":" in text:
        raise InputError(
            f"{name}: Replicate model ids are not accepted; give the https URL of a training's .tar, or"
            f" {ALLOWED_SOURCES.removeprefix('give ')}"
        )
    hint = "; to fetch a web address, start it with https://" if "." in text.partition("/")[0] else ""
    raise InputError(f"{name}: not a LoRA source; {ALLOWED_SOURCES}{hint}")


def existing_file(text: str) -> Path | None:
    """The local file a text names, or None (also for texts that cannot be paths, such as a long data URI)."""
    path = Path(text).expanduser()
    try:
        return path if path.is_file() else None
    except (OSError, ValueError):
        return None


def hugging_face_source(name: str, owner: str, repo: str, file: str | None) -> HuggingFaceSource:
    if file is not None:
        segments = file.split("/")
        if any(segment in ("", ".", "..") or not HF_PATH_SEGMENT.fullmatch(segment) for segment in segments):
            raise InputError(f"{name}: the file path in the Hugging Face repo {owner}/{repo} is not a plain path")
        if not file.lower().endswith(".safetensors"):
            raise InputError(
                f"{name}: only .safetensors files are loaded from Hugging Face; give owner/repo or"
                " owner/repo/path/file.safetensors"
            )
    return HuggingFaceSource(f"{owner}/{repo}", file)


def url_problem(url: str) -> str | None:
    """Why a URL (given or redirected to) cannot be fetched, or None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in DEFAULT_PORTS:
        return "only http and https URLs are fetched"
    if CONTROL_OR_SPACE.search(url):
        return "the URL contains spaces or control characters; percent-encode them"
    if parts.username is not None or parts.password is not None:
        return "user names and passwords in URLs are not supported; use a signed URL or a token input"
    if not parts.hostname:
        return "the URL has no host"
    try:
        parts.port  # noqa: B018 (parsing the port is the check)
    except ValueError:
        return "the URL's port is not a number from 0 to 65535"
    return None


def decode_data_uri(name: str, uri: str) -> bytes:
    """A data URI's bytes (base64 or percent-encoded); the size cap is checked from the length before decoding."""
    header, comma, payload = uri[len("data:") :].partition(",")
    if not comma:
        raise InputError(f"{name}: not a valid data URI (no comma before the data)")
    is_base64 = header.lower().endswith(";base64")
    decoded_size = len(payload) * 3 // 4 if is_base64 else len(payload) - 2 * payload.count("%")
    if decoded_size > limits.MAX_LORA_BYTES:
        raise too_large(name, decoded_size)
    if not is_base64:
        return urllib.parse.unquote_to_bytes(payload)
    try:
        return base64.b64decode("".join(urllib.parse.unquote(payload).split()), validate=True)
    except binascii.Error:
        raise InputError(f"{name}: the data URI's base64 is not valid") from None
