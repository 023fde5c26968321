"""The pinned HTTP client that fetches LoRA files: public addresses only, tokens only to their own hosts.

Written on the standard library's http.client because the serving stack has no requests or urllib3. It fetches only
from public addresses: it resolves each host itself, refuses it when any address is not global, then connects to that
checked address (so DNS rebinding cannot swap it) with the Host header and TLS name (certificates verified as usual)
of the URL's host; every redirect hop is checked the same way. It ignores proxy environment variables (http.client
never reads them). A token goes only to the origin it belongs to and is dropped for good once a redirect leaves it.
Logs and errors show URLs only as scheme://host/path (signed URLs carry credentials in their query) and never show
tokens.
"""

import contextlib
import functools
import http
import http.client
import ipaddress
import json
import logging
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path

from .. import limits, settings
from ..errors import InputError
from .messages import human_size, listed, one_line, redact, too_large
from .sources import DEFAULT_PORTS, HuggingFaceSource, url_problem

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 15.0
"""Seconds to wait for the TCP connection and the TLS handshake."""

READ_TIMEOUT_S = 60.0
"""Seconds a response may go without sending a byte: an idle timeout, not a limit on the whole download."""

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 1 << 20

MAX_LISTING_BYTES = 16 << 20
"""Largest Hugging Face repo listing (JSON, read into memory)."""


NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
HF_TOKENS_PAGE = "https://huggingface.co/settings/tokens"
USER_AGENT = "differential-diffusion-flash-sdxl/0.1 (LoRA fetch; Python http.client)"
HF_TOKEN_INPUT = "hf_api_token"
CIVITAI_TOKEN_INPUT = "civitai_api_token"


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


def checked_addresses(name: str, host: str, port: int) -> list[str]:
    """The host's addresses, refused when any of them is not public (unless private hosts are allowed)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise InputError(
            f"{name}: cannot resolve the host {one_line(host)} (DNS lookup failed); check the URL"
        ) from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not settings.enabled(settings.ALLOW_PRIVATE_LORA_HOSTS):  # tests and local runs serve LoRAs from 127.0.0.1
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


def is_hugging_face(url: str) -> bool:
    return origin(url) == origin(settings.hf_endpoint())


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


def get(name: str, url: str, authorization: str | None, deadline: float) -> http.client.HTTPResponse:
    """The 200 response for a URL, following up to MAX_REDIRECTS redirects, each hop checked like the first.

    The Authorization header goes only to the URL's own origin and is dropped for good once a redirect leaves it
    (Hugging Face and Civitai redirect downloads to signed CDN URLs). Other statuses raise HTTPStatusError.
    """
    first_url, first_origin = url, origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        check_deadline(name, first_url, deadline)
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


def download_deadline() -> float:
    """When a download that starts now must have finished ($LORA_DOWNLOAD_TIMEOUT from now, on the monotonic clock)."""
    return time.monotonic() + settings.seconds(settings.LORA_DOWNLOAD_TIMEOUT)


def check_deadline(name: str, url: str, deadline: float) -> None:
    if time.monotonic() > deadline:
        limit = settings.seconds(settings.LORA_DOWNLOAD_TIMEOUT)
        raise InputError(
            f"{name}: fetching {redact(url)} took longer than {limit:g} s ({settings.LORA_DOWNLOAD_TIMEOUT.name});"
            " use a faster host or try again"
        )


def save_body(name: str, response: http.client.HTTPResponse, url: str, file: Path, deadline: float) -> int:
    """Stream a response body into a file, within the LoRA size limit and the download's deadline; the number of bytes
    written. read1 returns what has arrived, so a server that trickles bytes is checked against the deadline after
    each arrival (one read waits at most the idle timeout)."""
    length = response.length  # http.client's reading of Content-Length: None when absent, invalid or chunked
    if length is not None and length > limits.MAX_LORA_BYTES:
        response.close()
        raise too_large(name, length)
    received = 0
    with response, file.open("wb") as out:
        while True:
            with reading(name, url):
                chunk = response.read1(CHUNK_BYTES)
            if not chunk:
                break
            check_deadline(name, url, deadline)
            received += len(chunk)
            if received > limits.MAX_LORA_BYTES:
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


def download_url(name: str, url: str, file: Path, authorization: str | None, deadline: float) -> int:
    try:
        response = get(name, url, authorization, deadline)
    except HTTPStatusError as error:
        raise status_error(name, error, url, token_given=authorization is not None) from None
    return save_body(name, response, url, file, deadline)


# Hugging Face


def hf_status_error(name: str, error: HTTPStatusError, repo: str, file: str | None, token_given: bool) -> InputError:
    page = f"{settings.hf_endpoint()}/{repo}"
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


def hf_repo_files(name: str, repo: str, hf_token: str | None, deadline: float) -> list[str]:
    """Every file path in a Hugging Face repo, from the listing API."""
    url = f"{settings.hf_endpoint()}/api/models/{repo}"
    try:
        response = get(name, url, authorization_for(url, hf_token, None), deadline)
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


def hf_lora_file(name: str, source: HuggingFaceSource, hf_token: str | None, deadline: float) -> str:
    """The file to fetch: the one given, else the repo's single .safetensors file."""
    if source.file is not None:
        return source.file
    candidates = sorted(
        path for path in hf_repo_files(name, source.repo, hf_token, deadline) if path.lower().endswith(".safetensors")
    )
    if not candidates:
        raise InputError(f"{name}: the Hugging Face repo {source.repo} has no .safetensors file; give one that has")
    if len(candidates) > 1:
        raise InputError(
            f"{name}: the Hugging Face repo {source.repo} has {len(candidates)} .safetensors files"
            f" ({listed(candidates)}); give one as {source.repo}/path/file.safetensors"
        )
    return candidates[0]


def download_hugging_face(
    name: str, source: HuggingFaceSource, file: Path, hf_token: str | None, deadline: float
) -> int:
    path = hf_lora_file(name, source, hf_token, deadline)
    url = f"{settings.hf_endpoint()}/{source.repo}/resolve/main/{urllib.parse.quote(path)}"
    try:
        response = get(name, url, authorization_for(url, hf_token, None), deadline)
    except HTTPStatusError as error:
        raise hf_status_error(name, error, source.repo, path, token_given=hf_token is not None) from None
    return save_body(name, response, url, file, deadline)
