"""Fetching user LoRA files safely, with an on-disk least-recently-used cache.

A LoRA source (the `lora_weights` and `extra_lora` inputs) is an http(s) URL of a safetensors file or of a Replicate
training's .tar, a Hugging Face repo (`owner/repo` or `owner/repo/path/file.safetensors`), or a data URI.
`fetch_lora` returns the path of a local file that is safetensors by its content (never judged by a name or an
extension); reading its tensors is another module's job.

The HTTP client is written on the standard library's http.client because the serving stack has no requests or
urllib3. It fetches only from public addresses: it resolves each host itself, refuses it when any address is not
global, then connects to that checked address (so DNS rebinding cannot swap it) with the Host header and TLS name
(certificates verified as usual) of the URL's host; every redirect hop is checked the same way. It ignores proxy
environment variables (http.client never reads them). A token goes only to the origin it belongs to and is dropped
for good once a redirect leaves it. Logs and errors show URLs only as scheme://host/path (signed URLs carry
credentials in their query) and never show tokens.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import functools
import hashlib
import http
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import ssl
import struct
import tarfile
import tempfile
import time
import urllib.parse
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from .errors import InputError
from .limits import LORA_CACHE_MAX_BYTES, LORA_CACHE_MIN_FREE_BYTES, MAX_LORA_BYTES
from .weights import model_cache

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 15.0
"""Seconds to wait for the TCP connection and the TLS handshake."""

READ_TIMEOUT_S = 60.0
"""Seconds a response may go without sending a byte: an idle timeout, not a limit on the whole download."""

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}
CHUNK_BYTES = 1 << 20

MAX_LISTING_BYTES = 16 << 20
"""Largest Hugging Face repo listing (JSON, read into memory)."""

MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
"""Largest JSON header a safetensors file may declare (the format's own limit)."""

STALE_TEMPORARY_S = 3600
"""Age after which a *.tmp file in the cache is the leftover of a crashed download and is removed."""

MAX_LISTED_NAMES = 8
"""File names shown in an error that lists candidates."""

NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
HF_TOKENS_PAGE = "https://huggingface.co/settings/tokens"
USER_AGENT = "differential-diffusion-flash-sdxl/0.1 (LoRA fetch; Python http.client)"
TRAINING_LORA_NAME = "lora.safetensors"
EMBEDDING_SUFFIXES = (".pti", ".pt")

ALLOW_PRIVATE_ENV = "ALLOW_PRIVATE_LORA_HOSTS"
CACHE_FOLDER_ENV = "LORA_CACHE"
CACHE_MAX_BYTES_ENV = "LORA_CACHE_MAX_BYTES"
CACHE_MIN_FREE_ENV = "LORA_CACHE_MIN_FREE_BYTES"
HF_ENDPOINT_ENV = "HF_ENDPOINT"
HF_TOKEN_INPUT = "hf_api_token"
CIVITAI_TOKEN_INPUT = "civitai_api_token"

ALLOWED_SOURCES = (
    "give an http(s) URL, a Hugging Face repo (owner/repo or owner/repo/path/file.safetensors) or a data URI"
)
PICKLE_REFUSAL = (
    "this is a PyTorch pickle/checkpoint file, not safetensors; only .safetensors LoRAs are loaded (pickles can run"
    " code)"
)
NOT_A_LORA = "not a LoRA file (not safetensors or a .tar of a Replicate training)"

SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
WINDOWS_PATH = re.compile(r"[A-Za-z]:[\\/]")
LOCAL_PATH_STARTS = ("/", "./", "../", "~", "\\", ".\\", "..\\")
HF_SOURCE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_-]*)/([A-Za-z0-9][A-Za-z0-9_.-]*)(?:/(.+))?")
HF_PATH_SEGMENT = re.compile(r"[^/\\\x00-\x1f\x7f]+")
CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")


# Sources


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


# Addresses and tokens


def is_public_address(address: str) -> bool:
    """Whether an IP address is globally routable: not loopback, private, link-local, multicast, reserved,
    unspecified or CGNAT, nor an IPv6 form (IPv4-mapped, 6to4, NAT64) of such an IPv4 address."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(str(embedded))
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


def private_hosts_allowed() -> bool:
    """Tests (and local runs) set ALLOW_PRIVATE_LORA_HOSTS=1 to serve LoRAs from 127.0.0.1."""
    return os.environ.get(ALLOW_PRIVATE_ENV) == "1"


def checked_addresses(name: str, host: str, port: int) -> list[str]:
    """The host's addresses, refused when any of them is not public (unless private hosts are allowed)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise InputError(
            f"{name}: cannot resolve the host {one_line(host)} (DNS lookup failed); check the URL"
        ) from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not private_hosts_allowed():
        refused = [address for address in addresses if not is_public_address(address)]
        if refused:
            raise InputError(
                f"{name}: {one_line(host)} resolves to {refused[0]}, which is not a public address;"
                " only public hosts are fetched"
            )
    return addresses


def origin(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname or "", parts.port or DEFAULT_PORTS.get(scheme, 0)


def is_civitai(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host == "civitai.com" or host.endswith(".civitai.com")


def hf_endpoint() -> str:
    return os.environ.get(HF_ENDPOINT_ENV, "").strip().rstrip("/") or DEFAULT_HF_ENDPOINT


def is_hugging_face(url: str) -> bool:
    return origin(url) == origin(hf_endpoint())


def authorization_for(url: str, hf_token: str | None, civitai_token: str | None) -> str | None:
    """The Authorization header for a URL: the Civitai token for civitai.com over https, the Hugging Face token for
    the Hugging Face endpoint, nothing for other hosts."""
    if civitai_token and is_civitai(url) and origin(url)[0] == "https":
        return f"Bearer {civitai_token}"
    if hf_token and is_hugging_face(url):
        return f"Bearer {hf_token}"
    return None


def clean_token(input_name: str, token: str | None) -> str | None:
    """A token input stripped, None when empty; refused when it could not be sent in a header."""
    token = (token or "").strip()
    if token and not all(33 <= ord(character) < 127 for character in token):
        raise InputError(f"{input_name}: must be a token of printable ASCII characters without spaces")
    return token or None


# HTTP


class HTTPStatusError(Exception):
    """A final answer other than 200, for the caller to word for its kind of source."""

    def __init__(self, status: int, reason: str, url: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.url = url

    @property
    def phrase(self) -> str:
        """The standard reason phrase rather than the server's own text, when there is one."""
        try:
            return http.HTTPStatus(self.status).phrase
        except ValueError:
            return one_line(self.reason, 60)


@functools.cache
def tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class PinnedConnection(http.client.HTTPConnection):
    """An HTTP or HTTPS connection to one checked IP address, with the Host header and the TLS server name (and so
    the certificate check) of the URL's host."""

    def __init__(self, host: str, port: int, address: str, tls: bool) -> None:
        super().__init__(host, port, timeout=CONNECT_TIMEOUT_S)
        self.address = address
        self.tls = tls

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), timeout=CONNECT_TIMEOUT_S)
        try:
            if self.tls:
                sock = tls_context().wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(READ_TIMEOUT_S)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def open_url(name: str, url: str, headers: Mapping[str, str]) -> http.client.HTTPResponse:
    """The one network step: GET the URL from a checked address of its host, and return the response with its status
    and headers read (the body not yet). Tests can put a fake in its place."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or DEFAULT_PORTS[parts.scheme.lower()]
    target = ascii_only(urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")))
    failure: OSError = OSError("no address")
    for address in checked_addresses(name, host, port):
        connection = PinnedConnection(host, port, address, tls=parts.scheme.lower() == "https")
        try:
            connection.connect()
        except OSError as error:
            failure = error
            continue
        try:
            connection.request("GET", target, headers={**headers, "Connection": "close"})
            return connection.getresponse()
        except BaseException:
            connection.close()
            raise
    raise connect_error(name, url, failure)


def ascii_only(target: str) -> str:
    """A request target with non-ASCII characters percent-encoded as UTF-8 (http.client sends ASCII only)."""
    return re.sub(r"[^\x00-\x7f]+", lambda match: urllib.parse.quote(match.group()), target)


def connect_error(name: str, url: str, error: OSError) -> InputError:
    host = one_line(urllib.parse.urlsplit(url).hostname or "")
    if isinstance(error, TimeoutError):
        return InputError(
            f"{name}: timed out fetching {redact(url)} after {CONNECT_TIMEOUT_S:g} s; try again or use another host"
        )
    if isinstance(error, ssl.SSLCertVerificationError):
        return InputError(
            f"{name}: the TLS certificate of {host} is not valid ({error.verify_message}); use another host"
        )
    if isinstance(error, ssl.SSLError):
        return InputError(f"{name}: TLS with {host} failed ({error.reason or error}); use another host")
    return InputError(f"{name}: cannot connect to {host} ({error.strerror or error}); check the URL or try again later")


@contextlib.contextmanager
def reading(name: str, url: str) -> Iterator[None]:
    """Network failures once connected (waiting for or reading a response) as one-line InputErrors."""
    try:
        yield
    except TimeoutError:
        raise InputError(
            f"{name}: timed out fetching {redact(url)} after {READ_TIMEOUT_S:g} s; try again or use another host"
        ) from None
    except (http.client.HTTPException, OSError) as error:
        reason = one_line(str(error) or type(error).__name__, 100)
        raise InputError(f"{name}: the connection broke while fetching {redact(url)} ({reason}); try again") from None


def get(name: str, url: str, authorization: str | None) -> http.client.HTTPResponse:
    """The 200 response for a URL, following up to MAX_REDIRECTS redirects, each hop checked like the first.

    The Authorization header goes only to the URL's own origin and is dropped for good once a redirect leaves it
    (Hugging Face and Civitai redirect downloads to signed CDN URLs). Other statuses raise HTTPStatusError.
    """
    first_url, first_origin = url, origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        if origin(url) != first_origin:
            authorization = None
        headers = {"User-Agent": USER_AGENT, "Accept": "*/*"}
        if authorization:
            headers["Authorization"] = authorization
        with reading(name, url):
            response = open_url(name, url, headers)
        if response.status not in REDIRECT_STATUSES:
            break
        location = response.getheader("Location")
        response.close()
        if not location:
            raise InputError(f"{name}: {redact(url)} answered {response.status} without a Location; check the URL")
        url = urllib.parse.urljoin(url, location.strip())
        if problem := url_problem(url):
            raise InputError(f"{name}: {redact(first_url)} redirects to a URL that cannot be fetched ({problem})")
        log.debug("%s: redirected to %s", name, redact(url))
    else:
        raise InputError(f"{name}: {redact(first_url)} redirects more than {MAX_REDIRECTS} times; give the final URL")
    if response.status != 200:
        response.close()
        raise HTTPStatusError(response.status, response.reason or "", url)
    return response


def too_large(name: str, size: int | None = None) -> InputError:
    limit = f"the {human_size(MAX_LORA_BYTES)} limit for LoRA files"
    if size is None:
        return InputError(f"{name}: the file is larger than {limit}")
    return InputError(f"{name}: the file is {human_size(size)}, more than {limit}")


def save_body(name: str, response: http.client.HTTPResponse, url: str, file: Path) -> int:
    """Stream a response body into a file, within MAX_LORA_BYTES; the number of bytes written."""
    length = response.length  # http.client's reading of Content-Length: None when absent, invalid or chunked
    if length is not None and length > MAX_LORA_BYTES:
        response.close()
        raise too_large(name, length)
    received = 0
    with response, file.open("wb") as out:
        while True:
            with reading(name, url):
                chunk = response.read(CHUNK_BYTES)
            if not chunk:
                break
            received += len(chunk)
            if received > MAX_LORA_BYTES:
                raise too_large(name)
            out.write(chunk)
    if length is not None and received != length:
        raise InputError(
            f"{name}: the download from {redact(url)} was cut off after {human_size(received)} of"
            f" {human_size(length)}; try again"
        )
    return received


def status_error(name: str, error: HTTPStatusError, url: str, token_given: bool) -> InputError:
    """A final HTTP status for a URL source, with what to do about it; the token hint depends on the host."""
    shown = redact(url)
    if error.status == 404:
        return InputError(f"{name}: not found (404) at {shown}; check the URL")
    if error.status in (401, 403):
        if is_civitai(url) and token_given:
            return InputError(
                f"{name}: {shown} refused {CIVITAI_TOKEN_INPUT} ({error.status}); check the key, and that your"
                " account may download this model"
            )
        if is_civitai(url):
            return InputError(
                f"{name}: {shown} needs a Civitai API key ({error.status}); give {CIVITAI_TOKEN_INPUT} (made in your"
                " civitai.com account settings)"
            )
        if is_hugging_face(url):
            return InputError(
                f"{name}: {shown} needs a Hugging Face token with access ({error.status}); give {HF_TOKEN_INPUT}, and"
                " accept the terms on the repo's page if it is gated"
            )
        return InputError(
            f"{name}: {shown} answered {error.status} {error.phrase}: the URL needs credentials; use a signed or"
            " public URL"
        )
    return generic_status_error(name, error, shown)


def generic_status_error(name: str, error: HTTPStatusError, shown: str) -> InputError:
    advice = "try again later" if error.status >= 500 or error.status == 429 else "check the URL"
    return InputError(f"{name}: {shown} answered HTTP {error.status} {error.phrase}; {advice}")


def download_url(name: str, url: str, file: Path, authorization: str | None) -> int:
    try:
        response = get(name, url, authorization)
    except HTTPStatusError as error:
        raise status_error(name, error, url, token_given=authorization is not None) from None
    return save_body(name, response, url, file)


# Hugging Face


def hf_status_error(name: str, error: HTTPStatusError, repo: str, file: str | None, token_given: bool) -> InputError:
    page = f"{hf_endpoint()}/{repo}"
    if error.status == 404 and file is None:
        return InputError(f"{name}: the Hugging Face repo {repo} was not found (404); check the name")
    if error.status == 404:
        return InputError(
            f"{name}: the Hugging Face repo {repo} has no file {one_line(file or '')} (404); check the path"
        )
    if error.status in (401, 403) and token_given:
        return InputError(
            f"{name}: {HF_TOKEN_INPUT} does not give access to the Hugging Face repo {repo} ({error.status}); if it is"
            f" gated, accept its terms at {page}, and use a token of an account that may read it"
        )
    if error.status in (401, 403):
        return InputError(
            f"{name}: the Hugging Face repo {repo} is gated, private or missing ({error.status}); give {HF_TOKEN_INPUT}"
            f" (a token from {HF_TOKENS_PAGE}), and accept the terms at {page} if it is gated"
        )
    return generic_status_error(name, error, f"Hugging Face ({redact(error.url)})")


def hf_repo_files(name: str, repo: str, hf_token: str | None) -> list[str]:
    """Every file path in a Hugging Face repo, from the listing API."""
    url = f"{hf_endpoint()}/api/models/{repo}"
    try:
        response = get(name, url, authorization_for(url, hf_token, None))
    except HTTPStatusError as error:
        raise hf_status_error(name, error, repo, None, token_given=hf_token is not None) from None
    with response, reading(name, url):
        body = response.read(MAX_LISTING_BYTES + 1)
    try:
        if len(body) > MAX_LISTING_BYTES:
            raise ValueError("listing too large")
        siblings = json.loads(body)["siblings"]
        return [str(sibling["rfilename"]) for sibling in siblings]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{name}: Hugging Face gave an unreadable file list for {repo}; try again later") from None


def hf_lora_file(name: str, source: HuggingFaceSource, hf_token: str | None) -> str:
    """The file to fetch: the one given, else the repo's single .safetensors file."""
    if source.file is not None:
        return source.file
    candidates = sorted(
        path for path in hf_repo_files(name, source.repo, hf_token) if path.lower().endswith(".safetensors")
    )
    if not candidates:
        raise InputError(f"{name}: the Hugging Face repo {source.repo} has no .safetensors file; give one that has")
    if len(candidates) > 1:
        raise InputError(
            f"{name}: the Hugging Face repo {source.repo} has {len(candidates)} .safetensors files"
            f" ({listed(candidates)}); give one as {source.repo}/path/file.safetensors"
        )
    return candidates[0]


def download_hugging_face(name: str, source: HuggingFaceSource, file: Path, hf_token: str | None) -> int:
    path = hf_lora_file(name, source, hf_token)
    url = f"{hf_endpoint()}/{source.repo}/resolve/main/{urllib.parse.quote(path)}"
    try:
        response = get(name, url, authorization_for(url, hf_token, None))
    except HTTPStatusError as error:
        raise hf_status_error(name, error, source.repo, path, token_given=hf_token is not None) from None
    return save_body(name, response, url, file)


# Data URIs


def decode_data_uri(name: str, uri: str) -> bytes:
    """A data URI's bytes (base64 or percent-encoded); the size cap is checked from the length before decoding."""
    header, comma, payload = uri[len("data:") :].partition(",")
    if not comma:
        raise InputError(f"{name}: not a valid data URI (no comma before the data)")
    is_base64 = header.lower().endswith(";base64")
    decoded_size = len(payload) * 3 // 4 if is_base64 else len(payload) - 2 * payload.count("%")
    if decoded_size > MAX_LORA_BYTES:
        raise too_large(name, decoded_size)
    if not is_base64:
        return urllib.parse.unquote_to_bytes(payload)
    try:
        return base64.b64decode("".join(urllib.parse.unquote(payload).split()), validate=True)
    except binascii.Error:
        raise InputError(f"{name}: the data URI's base64 is not valid") from None


# Content


class FileKind(enum.Enum):
    SAFETENSORS = "safetensors"
    DAMAGED_SAFETENSORS = "damaged safetensors"
    TAR = "tar"
    PICKLE = "pickle"
    ZIP = "zip"
    OTHER = "other"


def safetensors_problem(path: Path) -> str | None:
    """What keeps a file from being a whole safetensors file, or None when it is one.

    The layout: a little-endian u64 N, N bytes of UTF-8 JSON (a dict of tensors, each with its byte range), then
    the tensor bytes, which must end exactly where the file does.
    """
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            return "shorter than a safetensors header"
        (header_size,) = struct.unpack("<Q", prefix)
        if not 2 <= header_size <= MAX_SAFETENSORS_HEADER_BYTES:
            return f"implausible header size {header_size}"
        if 8 + header_size > size:
            return "the header runs past the end of the file, which is truncated"
        header_bytes = file.read(header_size)
    if not header_bytes.startswith(b"{"):
        return "the header is not a JSON object"
    try:
        header = json.loads(header_bytes.decode("utf-8"))
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "the header is not valid safetensors JSON"
    body = size - 8 - header_size
    end = max(ends, default=0)
    if end > body:
        return f"tensor data ends at byte {end} but the file has {body}, so it is truncated"
    if end < body:
        return f"{body - end} bytes after the last tensor"
    return None


def file_kind(path: Path) -> FileKind:
    """What a file is, judged by its bytes alone."""
    with path.open("rb") as file:
        head = file.read(512)
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= MAX_SAFETENSORS_HEADER_BYTES:
        return FileKind.DAMAGED_SAFETENSORS if safetensors_problem(path) else FileKind.SAFETENSORS
    if head[257:262] == b"ustar" or (head and tarfile.is_tarfile(path)):
        return FileKind.TAR
    if head[:1] == b"\x80":
        return FileKind.PICKLE
    if head[:4] == b"PK\x03\x04":
        return FileKind.ZIP
    return FileKind.OTHER


def require_safetensors(name: str, path: Path) -> None:
    kind = file_kind(path)
    if kind is FileKind.SAFETENSORS:
        return
    if kind is FileKind.DAMAGED_SAFETENSORS:
        raise InputError(f"{name}: a damaged safetensors file ({safetensors_problem(path)}); check the source")
    if kind in (FileKind.PICKLE, FileKind.ZIP):
        raise InputError(f"{name}: {PICKLE_REFUSAL}")
    raise InputError(f"{name}: {NOT_A_LORA}")


def training_lora_member(name: str, members: list[tarfile.TarInfo]) -> tarfile.TarInfo:
    """The LoRA of a Replicate training: lora.safetensors, else the only .safetensors file; embeddings (pickles)
    are ignored with a warning. Only regular files count: links, devices and folders are skipped."""
    files = [member for member in members if member.isfile()]
    for member in files:
        if member.name.lower().endswith(EMBEDDING_SUFFIXES):
            log.warning(
                "%s: ignoring %s in the .tar: textual-inversion embeddings are pickles and are not loaded",
                name,
                one_line(member.name),
            )
    candidates = [member for member in files if member.name.lower().endswith(".safetensors")]
    named = [member for member in candidates if PurePosixPath(member.name).name == TRAINING_LORA_NAME]
    chosen = named or candidates
    if len(chosen) == 1:
        return chosen[0]
    if not chosen:
        raise InputError(f"{name}: the .tar has no .safetensors file, so it is not a Replicate LoRA training")
    raise InputError(
        f"{name}: the .tar has several .safetensors files and no single {TRAINING_LORA_NAME}"
        f" ({listed([member.name for member in chosen])}); give the URL of one .safetensors file"
    )


def extract_training_lora(name: str, archive: Path, target: Path) -> None:
    """Copy the LoRA member of a training .tar into target, a file of our choosing (never a path from the archive;
    nothing else is extracted)."""
    try:
        with tarfile.open(archive, "r:") as tar:
            member = training_lora_member(name, tar.getmembers())
            if member.size > MAX_LORA_BYTES:
                raise too_large(name, member.size)
            source = tar.extractfile(member)
            if source is None:
                raise tarfile.ReadError(f"cannot read {member.name}")
            with source, target.open("wb") as out:
                shutil.copyfileobj(source, out, CHUNK_BYTES)
    except (tarfile.TarError, EOFError) as error:
        raise InputError(
            f"{name}: the .tar is damaged or compressed ({one_line(str(error), 100)}); give a training's plain .tar"
        ) from None


# Cache


def env_bytes(variable: str, default: int) -> int:
    value = os.environ.get(variable, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise ValueError(f"{variable} must be a whole number of bytes, got {value!r}")
    return int(value)


def default_cache_folder() -> Path:
    """$LORA_CACHE, else a sibling of the weights folder: <MODEL_CACHE>.loras."""
    if folder := os.environ.get(CACHE_FOLDER_ENV, "").strip():
        return Path(folder)
    weights = model_cache().resolve()
    return weights.with_name(f"{weights.name}.loras")


def cache_key(text: str) -> str:
    """The cache key of a source: sha256 of its stripped text (tokens are no part of it)."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


class LoraCache:
    """Fetched LoRAs on disk, `<key>.safetensors` each with a `<key>.json` note for people, least recently used
    evicted first. An entry appears only by os.replace of a complete, checked file, so a crash leaves no
    complete-looking entry, only a *.tmp file that a later fetch removes."""

    def __init__(
        self, folder: Path | None = None, max_bytes: int | None = None, min_free_bytes: int | None = None
    ) -> None:
        self.folder = folder if folder is not None else default_cache_folder()
        self.max_bytes = max_bytes if max_bytes is not None else env_bytes(CACHE_MAX_BYTES_ENV, LORA_CACHE_MAX_BYTES)
        self.min_free_bytes = (
            min_free_bytes if min_free_bytes is not None else env_bytes(CACHE_MIN_FREE_ENV, LORA_CACHE_MIN_FREE_BYTES)
        )

    def entry(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def lookup(self, key: str) -> Path | None:
        """The entry for a key, marked as just used; None when absent (or damaged, which is removed)."""
        path = self.entry(key)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        if file_kind(path) is not FileKind.SAFETENSORS:
            log.warning("LoRA cache: removing damaged entry %s", path.name)
            self.remove(path)
            return None
        return path

    @contextlib.contextmanager
    def temporary(self) -> Iterator[Path]:
        """A new empty *.tmp file in the cache folder for work in progress, removed unless moved into place."""
        self.folder.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(descriptor)
        path = Path(name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def add(self, key: str, file: Path, description: str, in_use: Collection[Path] = ()) -> Path:
        """Move a checked file into place as the key's entry, then evict what the limits require."""
        path = self.entry(key)
        os.replace(file, path)
        note = {"source": description, "bytes": path.stat().st_size, "fetched_at": datetime.now(UTC).isoformat()}
        with self.temporary() as partial:
            partial.write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
            os.replace(partial, path.with_suffix(".json"))
        self.remove_leftovers()
        self.evict(keep=[path, *in_use])
        return path

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)

    def entries(self) -> list[tuple[Path, os.stat_result]]:
        """Every entry with its stat, least recently used first."""
        found = []
        for path in self.folder.glob("*.safetensors"):
            with contextlib.suppress(FileNotFoundError):
                found.append((path, path.stat()))
        return sorted(found, key=lambda item: item[1].st_mtime)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.folder).free

    def needs_room(self, total: int) -> bool:
        return total > self.max_bytes or self.free_bytes() < self.min_free_bytes

    def evict(self, keep: Collection[Path]) -> None:
        """Remove least recently used entries while the cache is over max_bytes or the disk under min_free_bytes,
        never one in keep; warn when the entries in keep alone break a limit."""
        kept = {Path(path).resolve() for path in keep}
        entries = self.entries()
        total = sum(stat.st_size for _, stat in entries)
        for path, stat in entries:
            if not self.needs_room(total):
                return
            if path.resolve() in kept:
                continue
            self.remove(path)
            total -= stat.st_size
            log.info("LoRA cache: evicted %s (%s)", path.name, human_size(stat.st_size))
        if self.needs_room(total):
            log.warning(
                "LoRA cache %s: %s of entries, %s free on the disk, beyond its limits (%s, at least %s free); kept the"
                " entries in use",
                self.folder,
                human_size(total),
                human_size(self.free_bytes()),
                human_size(self.max_bytes),
                human_size(self.min_free_bytes),
            )

    def remove_leftovers(self) -> None:
        """*.tmp files older than STALE_TEMPORARY_S (crashed downloads) and notes whose entry is gone."""
        now = time.time()
        for path in self.folder.glob("*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > STALE_TEMPORARY_S:
                    path.unlink()
        for note in self.folder.glob("*.json"):
            if not note.with_suffix(".safetensors").exists():
                note.unlink(missing_ok=True)


# The entry point


def fetch_lora(
    name: str,
    text: str | None,
    *,
    hf_token: str | None,
    civitai_token: str | None,
    cache: LoraCache,
    allow_paths: bool = False,
    in_use: Collection[Path] = (),
) -> Path | None:
    """The local safetensors file of a LoRA source, from the cache or fetched into it; None for an empty source.

    `in_use` names files that eviction must not remove, such as the other LoRA of the same request:
    `extra = fetch_lora("extra_lora", ..., in_use=[main])` after `main = fetch_lora("lora_weights", ...)`.
    """
    source = parse_source(name, text or "", allow_paths=allow_paths)
    if source is None:
        return None
    if isinstance(source, LocalFile):
        return local_lora(name, source, cache, in_use)
    key = cache_key(text or "")
    if (hit := cache.lookup(key)) is not None:
        log.info("%s: from the cache (%s, %s)", name, source.description, human_size(hit.stat().st_size))
        return hit
    hf_token = clean_token(HF_TOKEN_INPUT, hf_token)
    civitai_token = clean_token(CIVITAI_TOKEN_INPUT, civitai_token)
    started = time.monotonic()
    with cache.temporary() as download:
        if isinstance(source, UrlSource):
            size = download_url(name, source.url, download, authorization_for(source.url, hf_token, civitai_token))
        elif isinstance(source, HuggingFaceSource):
            size = download_hugging_face(name, source, download, hf_token)
        else:
            data = decode_data_uri(name, source.uri)
            download.write_bytes(data)
            size = len(data)
        path = add_lora(name, download, key, source.description, cache, in_use)
    log.info("%s: fetched %s (%s) in %.1fs", name, source.description, human_size(size), time.monotonic() - started)
    return path


def add_lora(name: str, file: Path, key: str, description: str, cache: LoraCache, in_use: Collection[Path]) -> Path:
    """Check a fetched file and move it into the cache: a safetensors file as it is, a training .tar as its LoRA."""
    if file_kind(file) is FileKind.TAR:
        return add_training_lora(name, file, key, description, cache, in_use)
    require_safetensors(name, file)
    return cache.add(key, file, description, in_use)


def add_training_lora(
    name: str, archive: Path, key: str, description: str, cache: LoraCache, in_use: Collection[Path]
) -> Path:
    """Cache the LoRA member of a training .tar (the archive itself is left where it is)."""
    with cache.temporary() as member:
        extract_training_lora(name, archive, member)
        require_safetensors(name, member)
        return cache.add(key, member, description, in_use)


def local_lora(name: str, source: LocalFile, cache: LoraCache, in_use: Collection[Path]) -> Path:
    """A local safetensors file is used where it lies; a local training .tar has its LoRA copied into the cache
    (afresh each time, since the file may have changed)."""
    if file_kind(source.path) is FileKind.TAR:
        key = cache_key(str(source.path.resolve()))
        return add_training_lora(name, source.path, key, source.description, cache, in_use)
    require_safetensors(name, source.path)
    log.info("%s: using the local file %s", name, source.path)
    return source.path
