"""models/loras (sources, client, files, cache, fetch) offline: pure functions on their own, and
whole fetches from loopback HTTP(S) servers in threads,
with a fake resolver where a test needs a host name that is not 127.0.0.1 or localhost."""

import base64
import json
import os
import pickle
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from models import limits
from models.errors import InputError, SettingError
from models.loras import client as http_client
from models.loras.cache import LoraCache, cache_key
from models.loras.client import authorization_for, checked_addresses, is_public_address
from models.loras.fetch import fetch_lora
from models.loras.files import NOT_A_LORA, PICKLE_REFUSAL, FileKind, file_kind, require_safetensors
from models.loras.messages import redact
from models.loras.sources import DataSource, HuggingFaceSource, LocalFile, UrlSource, parse_source
from tests.support.loras import tar_of

NAME = "lora_weights"
HF_TOKEN = "hf_SECRET_TOKEN"
CIVITAI_TOKEN = "civitai_SECRET_TOKEN"


def lora_bytes(seed: int = 0) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return save({"lora_A.weight": torch.randn(4, 16, generator=generator), "lora_B.weight": torch.zeros(16, 4)})


LORA = lora_bytes()


def data_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def refused(call: Callable[[], object], *fragments: str, name: str = NAME) -> str:
    """The one-line InputError the call raises, checked to start with the input's name and hold the fragments."""
    with pytest.raises(InputError) as raised:
        call()
    message = str(raised.value)
    assert message.startswith(f"{name}: "), message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# A loopback server


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


Route = Callable[[BaseHTTPRequestHandler], None]


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
         length: bool = True) -> None:  # fmt: skip
    handler.send_response(status)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """Clients that time out on purpose leave broken pipes behind; they are not test failures."""


@dataclass
class LoraServer:
    """HTTP/1.0 on 127.0.0.1 (a body without Content-Length ends when the connection closes); records requests."""

    tls: ssl.SSLContext | None = None
    routes: dict[str, Route] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.seen.append(Seen(self.path, dict(self.headers)))
                route = server.routes.get(urllib.parse.urlsplit(self.path).path)
                if route is None:
                    send(self, 404, b"not found")
                else:
                    route(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    def file(self, path: str, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> str:
        self.routes[path] = lambda handler: send(handler, status, body, headers)
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        self.routes[path] = lambda handler: send(handler, status, headers={"Location": location})
        return self.url(path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for variable in (
        "ALLOW_PRIVATE_LORA_HOSTS", "HF_ENDPOINT", "LORA_CACHE", "LORA_CACHE_MAX_BYTES", "LORA_CACHE_MIN_FREE_BYTES",
    ):  # fmt: skip
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def server():
    lora_server = LoraServer()
    yield lora_server
    lora_server.close()


@pytest.fixture
def private_ok(monkeypatch):
    monkeypatch.setenv("ALLOW_PRIVATE_LORA_HOSTS", "1")


@pytest.fixture
def cache(tmp_path) -> LoraCache:
    return LoraCache(tmp_path / "loras", max_bytes=1 << 40, min_free_bytes=0)


@dataclass
class FakeDNS:
    addresses: dict[str, list[str]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)


@pytest.fixture
def dns(monkeypatch) -> FakeDNS:
    """Names in `addresses` resolve to the given addresses (none: a failed lookup); others go to the real resolver,
    which here only ever sees IP literals and localhost."""
    fake, real = FakeDNS(), socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in fake.addresses:
            return real(host, port, *args, **kwargs)
        fake.lookups.append(host)
        if not fake.addresses[host]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
            for address in fake.addresses[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return fake


def get_lora(text: str, cache: LoraCache, **options) -> Path:
    options.setdefault("hf_token", None)
    options.setdefault("civitai_token", None)
    path = fetch_lora(NAME, text, cache=cache, **options)
    assert path is not None
    return path


def cache_files(cache: LoraCache) -> list[str]:
    return sorted(path.name for path in cache.folder.iterdir()) if cache.folder.exists() else []


# parse_source


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://example.com/loras/style.safetensors", UrlSource("https://example.com/loras/style.safetensors")),
        ("  http://example.com/x\n", UrlSource("http://example.com/x")),
        (
            "https://civitai.com/api/download/models/12345?type=Model&format=SafeTensor",
            UrlSource("https://civitai.com/api/download/models/12345?type=Model&format=SafeTensor"),
        ),
        (
            "https://replicate.delivery/pbxt/abc/trained_model.tar",
            UrlSource("https://replicate.delivery/pbxt/abc/trained_model.tar"),
        ),
        ("HTTPS://[2606:4700::1111]:8443/x", UrlSource("HTTPS://[2606:4700::1111]:8443/x")),
        ("owner/repo", HuggingFaceSource("owner/repo", None)),
        ("some-1/my_repo.v2/sub/dir/a.safetensors", HuggingFaceSource("some-1/my_repo.v2", "sub/dir/a.safetensors")),
        ("data:application/octet-stream;base64,AAAA", DataSource("data:application/octet-stream;base64,AAAA")),
        ("DATA:,abc", DataSource("DATA:,abc")),
    ],
)  # fmt: skip
def test_parse_source_kinds(text, expected):
    assert parse_source(NAME, text) == expected


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_parse_source_empty_is_none(text):
    assert parse_source(NAME, text) is None
    assert fetch_lora(NAME, text, hf_token=None, civitai_token=None, cache=LoraCache(Path("unused"))) is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("file:///etc/passwd", "file:// URLs are not accepted"),
        ("FILE://localhost/etc/passwd", "file:// URLs are not accepted"),
        ("/etc/passwd", "local paths are not accepted"),
        ("./lora.safetensors", "local paths are not accepted"),
        ("../lora.safetensors", "local paths are not accepted"),
        ("~/lora.safetensors", "local paths are not accepted"),
        ("C:\\loras\\style.safetensors", "local paths are not accepted"),
        ("c:/loras/style.safetensors", "local paths are not accepted"),
        ("\\\\server\\share\\style.safetensors", "local paths are not accepted"),
        ("ftp://example.com/lora.safetensors", "ftp: sources are not supported"),
        ("s3://bucket/lora.safetensors", "s3: sources are not supported"),
        ("gs://bucket/lora.safetensors", "gs: sources are not supported"),
        ("stability-ai/sdxl:39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b", "Replicate model ids"),
        ("civitai.com/api/download/models/12345", "start it with https://"),
        ("a LoRA please", "not a LoRA source"),
        ("owner", "not a LoRA source"),
        ("https:///lora.safetensors", "the URL has no host"),
        ("https://example.com:99999/lora.safetensors", "port"),
        ("https://example.com/my lora.safetensors", "spaces or control characters"),
        ("owner/repo/model.bin", "only .safetensors files are loaded"),
        ("owner/repo/../other/x.safetensors", "not a plain path"),
        ("owner/repo//x.safetensors", "not a plain path"),
    ],
)
def test_parse_source_refusals(text, fragment):
    message = refused(lambda: parse_source(NAME, text), fragment)
    assert "http(s) URL" in message or "Hugging Face" in message or "port" in message


def test_parse_source_never_repeats_a_password():
    message = refused(lambda: parse_source(NAME, "https://me:hunter2@example.com/x"), "user names and passwords")
    assert "hunter2" not in message


def test_parse_source_local_paths_only_with_allow_paths(tmp_path, monkeypatch):
    (tmp_path / "loras").mkdir()
    lora = tmp_path / "loras" / "style.safetensors"
    lora.write_bytes(LORA)
    assert parse_source(NAME, str(lora), allow_paths=True) == LocalFile(lora)
    monkeypatch.chdir(tmp_path)
    assert parse_source(NAME, "loras/style.safetensors", allow_paths=True) == LocalFile(Path("loras/style.safetensors"))
    refused(lambda: parse_source(NAME, str(lora)), "local paths are not accepted")
    refused(lambda: parse_source(NAME, str(tmp_path / "missing.safetensors"), allow_paths=True), "no such file")
    assert parse_source(NAME, data_uri(b"x" * 10_000), allow_paths=True) == DataSource(data_uri(b"x" * 10_000))
    assert parse_source(NAME, "owner/repo", allow_paths=True) == HuggingFaceSource("owner/repo", None)


def test_redact_keeps_only_scheme_host_and_path():
    signed = "https://user:pw@CDN.Example.com:8443/a/b.safetensors?X-Amz-Signature=abc&token=t#part"
    assert redact(signed) == "https://cdn.example.com:8443/a/b.safetensors"
    assert redact("http://[::1]:8080/x?y=1") == "http://[::1]:8080/x"
    assert redact("https://civitai.com/api/download/models/1?token=t") == "https://civitai.com/api/download/models/1"


# Addresses and tokens


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("93.184.216.34", True),
        ("2606:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False),
        ("127.8.9.10", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("239.255.255.250", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("192.0.2.1", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("fd12:3456::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("::127.0.0.1", False),
        ("2002:7f00:1::", False),
        ("2002:c0a8:101::1", False),
        ("64:ff9b::a00:1", False),
        ("2001:db8::1", False),
        ("not an address", False),
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(address) is public


def test_checked_addresses_refuses_any_private_address(dns, monkeypatch):
    dns.addresses.update({
        "lora.example.com": ["10.0.0.5"],
        "mixed.example.com": ["93.184.216.34", "192.168.1.2"],
        "public.example.com": ["93.184.216.34", "2606:2800:220:1::1"],
        "mapped.example.com": ["::ffff:127.0.0.1"],
        "nowhere.example.com": [],
    })  # fmt: skip
    refused(lambda: checked_addresses(NAME, "lora.example.com", 443), "lora.example.com resolves to 10.0.0.5")
    refused(lambda: checked_addresses(NAME, "mixed.example.com", 443), "resolves to 192.168.1.2", "not a public")
    refused(lambda: checked_addresses(NAME, "mapped.example.com", 443), "not a public address")
    refused(lambda: checked_addresses(NAME, "nowhere.example.com", 443), "cannot resolve the host nowhere.example.com")
    assert checked_addresses(NAME, "public.example.com", 443) == ["93.184.216.34", "2606:2800:220:1::1"]
    monkeypatch.setenv("ALLOW_PRIVATE_LORA_HOSTS", "1")
    assert checked_addresses(NAME, "lora.example.com", 443) == ["10.0.0.5"]


def test_authorization_goes_only_to_the_token_s_own_host(monkeypatch):
    def authorization(url: str) -> str | None:
        return authorization_for(url, HF_TOKEN, CIVITAI_TOKEN)

    assert authorization("https://civitai.com/api/download/models/1") == f"Bearer {CIVITAI_TOKEN}"
    assert authorization("https://www.civitai.com/api/download/models/1") == f"Bearer {CIVITAI_TOKEN}"
    assert authorization("http://civitai.com/api/download/models/1") is None  # never in clear text
    assert authorization("https://evilcivitai.com/x") is None
    assert authorization("https://civitai.com.evil.net/x") is None
    assert authorization("https://huggingface.co/owner/repo/resolve/main/x.safetensors") == f"Bearer {HF_TOKEN}"
    assert authorization("https://cdn-lfs.huggingface.co/x") is None
    assert authorization("https://example.com/x.safetensors") is None
    assert authorization_for("https://civitai.com/x", HF_TOKEN, None) is None
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    assert authorization("http://127.0.0.1:9/api/models/owner/repo") == f"Bearer {HF_TOKEN}"
    assert authorization("https://huggingface.co/owner/repo/resolve/main/x.safetensors") is None


def test_tokens_with_spaces_or_newlines_are_refused(cache):
    refused(
        lambda: get_lora("owner/repo", cache, hf_token="hf_abc\r\nX-Evil: 1"),
        "must be a token of printable ASCII",
        name="hf_api_token",
    )


# Content


@pytest.fixture
def samples(tmp_path) -> dict[str, Path]:
    contents = {
        "safetensors": LORA,
        "truncated": LORA[:-5],
        "header_cut": LORA[:20],
        "trailing": LORA + b"\0",
        "bad_json": (8).to_bytes(8, "little") + b"{not js}",
        "tar": tar_of({"lora.safetensors": LORA}),
        "pickle": pickle.dumps({"lora_A.weight": [1.0, 2.0]}, protocol=4),
        "html": b"<!DOCTYPE html><html><body>Sign in to download</body></html>",
        "empty": b"",
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    paths["torch_zip"] = tmp_path / "torch_zip"
    torch.save({"lora_A.weight": torch.zeros(2)}, paths["torch_zip"])
    paths["zip"] = tmp_path / "zip"
    with zipfile.ZipFile(paths["zip"], "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    return paths


@pytest.mark.parametrize(
    ("sample", "kind"),
    [
        ("safetensors", FileKind.SAFETENSORS),
        ("truncated", FileKind.DAMAGED_SAFETENSORS),
        ("header_cut", FileKind.DAMAGED_SAFETENSORS),
        ("trailing", FileKind.DAMAGED_SAFETENSORS),
        ("bad_json", FileKind.DAMAGED_SAFETENSORS),
        ("tar", FileKind.TAR),
        ("pickle", FileKind.PICKLE),
        ("torch_zip", FileKind.ZIP),
        ("zip", FileKind.ZIP),
        ("html", FileKind.OTHER),
        ("empty", FileKind.OTHER),
    ],
)
def test_file_kind_by_content(samples, sample, kind):
    assert file_kind(samples[sample]) is kind


@pytest.mark.parametrize(
    ("sample", "fragment"),
    [
        ("truncated", "truncated"),
        ("header_cut", "truncated"),
        ("trailing", "after the last tensor"),
        ("bad_json", "not valid safetensors JSON"),
        ("pickle", PICKLE_REFUSAL),
        ("torch_zip", PICKLE_REFUSAL),
        ("html", NOT_A_LORA),
        ("empty", NOT_A_LORA),
        ("tar", NOT_A_LORA),
    ],
)
def test_require_safetensors_messages(samples, sample, fragment):
    refused(lambda: require_safetensors(NAME, samples[sample]), fragment)


# Data URIs and .tar files (no server needed)


def test_data_uris_base64_and_percent_encoded(cache):
    assert get_lora(data_uri(LORA), cache).read_bytes() == LORA
    percent = "data:," + urllib.parse.quote_from_bytes(lora_bytes(1))
    assert get_lora(percent, cache).read_bytes() == lora_bytes(1)
    refused(lambda: get_lora("data:application/octet-stream;base64,AAA*", cache), "base64 is not valid")
    refused(lambda: get_lora("data:application/octet-stream;base64", cache), "not a valid data URI")


def test_data_uri_size_is_checked_before_decoding(cache, monkeypatch):
    monkeypatch.setattr(limits, "MAX_LORA_BYTES", 1000)
    refused(lambda: get_lora("data:;base64," + "*" * 2000, cache), "more than the 1000 bytes limit")
    refused(lambda: get_lora("data:," + "x" * 1001, cache), "more than the 1000 bytes limit")


def test_training_tar_uses_lora_safetensors_and_ignores_embeddings(cache, caplog):
    training = tar_of({
        "embeddings.pti": pickle.dumps({"emb": [0.0]}),
        "lora.safetensors": LORA,
        "special_params.json": b"{}",
    })  # fmt: skip
    with caplog.at_level("WARNING", logger="models.loras"):
        path = get_lora(data_uri(training), cache)
    assert path.read_bytes() == LORA
    assert "ignoring embeddings.pti" in caplog.text and "pickles" in caplog.text
    assert cache_files(cache) == [path.with_suffix(".json").name, path.name]


@pytest.mark.parametrize(
    ("files", "symlinks", "outcome"),
    [
        ({"output/model.safetensors": LORA, "notes.pt": b"\x80\x02."}, {}, LORA),
        ({"a/lora.safetensors": LORA, "b/extra.safetensors": lora_bytes(1)}, {}, LORA),
        ({"../../escape.safetensors": LORA}, {}, LORA),
        ({"a.safetensors": LORA, "b/c.safetensors": LORA}, {}, "several .safetensors files and no single"),
        ({"special_params.json": b"{}"}, {}, "has no .safetensors file"),
        ({}, {"lora.safetensors": "/etc/passwd"}, "has no .safetensors file"),
        ({"lora.safetensors": pickle.dumps([1])}, {}, PICKLE_REFUSAL),
        ({"lora.safetensors": LORA[:-3]}, {}, "not a usable safetensors LoRA"),
    ],
)
def test_training_tar_member_choice(tmp_path, cache, files, symlinks, outcome):
    source = data_uri(tar_of(files, symlinks))
    if isinstance(outcome, bytes):
        assert get_lora(source, cache).read_bytes() == outcome
        assert not list(tmp_path.glob("escape*"))
    else:
        message = refused(lambda: get_lora(source, cache), outcome)
        if "several" in outcome:
            assert "a.safetensors, b/c.safetensors" in message
        assert not list(cache.folder.glob("*.safetensors"))


def test_local_files_with_allow_paths(tmp_path, cache, samples):
    assert get_lora(str(samples["safetensors"]), cache, allow_paths=True) == samples["safetensors"]
    assert not cache.folder.exists()  # used where it lies, no copy
    assert get_lora(str(samples["tar"]), cache, allow_paths=True).read_bytes() == LORA
    assert samples["tar"].exists()
    refused(lambda: get_lora(str(samples["pickle"]), cache, allow_paths=True), PICKLE_REFUSAL)


# Fetching over HTTP


def test_fetches_a_url_then_serves_it_from_the_cache_with_no_request(server, cache, private_ok, caplog, monkeypatch):
    url = server.file("/loras/style.safetensors", LORA)
    with caplog.at_level("INFO", logger="models.loras"):
        path = get_lora(url, cache)
    assert path.read_bytes() == LORA and path.parent == cache.folder
    assert path.name == f"{cache_key(url)}.safetensors"
    assert f"{NAME}: fetched {url} (" in caplog.text and "s\n" in caplog.text
    note = json.loads(path.with_suffix(".json").read_text())
    assert note["source"] == url and note["bytes"] == len(LORA) and note["fetched_at"]

    os.utime(path, (1_000_000, 1_000_000))
    monkeypatch.setattr(http_client, "open_url", lambda *args: pytest.fail("a cache hit must not touch the network"))
    caplog.clear()
    with caplog.at_level("INFO", logger="models.loras"):
        assert get_lora(f"  {url}\n", cache, hf_token="other", civitai_token="tokens") == path
    assert len(server.seen) == 1
    assert f"{NAME}: from the cache ({url}," in caplog.text
    assert path.stat().st_mtime > time.time() - 60  # the hit refreshed its recency


def test_civitai_like_url_without_a_file_name(server, cache, private_ok, caplog):
    server.file("/api/download/models/12345", LORA, headers={"Content-Type": "application/octet-stream"})
    url = server.url("/api/download/models/12345?type=Model&format=SafeTensor&token=QUERY_SECRET")
    with caplog.at_level("DEBUG", logger="models.loras"):
        assert get_lora(url, cache).read_bytes() == LORA
    assert server.seen[0].path == "/api/download/models/12345?type=Model&format=SafeTensor&token=QUERY_SECRET"
    assert "QUERY_SECRET" not in caplog.text
    assert "QUERY_SECRET" not in json.dumps([path.read_text() for path in cache.folder.glob("*.json")])


def test_redirect_chain_absolute_and_relative(server, cache, private_ok):
    server.redirect("/r1", "/r2")
    server.redirect("/r2", server.url("/dir/r3"), status=301)
    server.redirect("/dir/r3", "final.safetensors", status=307)
    server.file("/dir/final.safetensors", LORA)
    assert get_lora(server.url("/r1"), cache).read_bytes() == LORA
    assert [seen.path for seen in server.seen] == ["/r1", "/r2", "/dir/r3", "/dir/final.safetensors"]


def test_non_ascii_url_paths_are_percent_encoded(server, cache, private_ok):
    server.file("/loras/%C3%BCber%20style.safetensors", LORA)
    assert get_lora(server.url("/loras/über%20style.safetensors"), cache).read_bytes() == LORA


def test_redirect_limits(server, cache, private_ok):
    server.redirect("/loop", "/loop", status=308)
    refused(lambda: get_lora(server.url("/loop"), cache), "redirects more than 5 times")
    assert len(server.seen) == 6
    server.redirect("/to-ftp", "ftp://example.com/lora.safetensors")
    refused(lambda: get_lora(server.url("/to-ftp"), cache), "cannot be fetched (only http and https")
    server.routes["/nowhere"] = lambda handler: send(handler, 302)
    refused(lambda: get_lora(server.url("/nowhere"), cache), "without a Location")


def test_hugging_face_file_redirect_to_another_host_drops_the_token(server, cache, private_ok, monkeypatch, caplog):
    monkeypatch.setenv("HF_ENDPOINT", server.url(""))
    server.redirect("/owner/repo/resolve/main/sub/lora.safetensors", "/owner/repo/resolve/abc123/sub/lora.safetensors")
    server.redirect(
        "/owner/repo/resolve/abc123/sub/lora.safetensors",
        server.url("/cdn/lora.safetensors?X-Amz-Signature=SIGNATURE_SECRET", host="localhost"),
    )
    server.redirect("/cdn/lora.safetensors", server.url("/back/lora.safetensors"))
    server.file("/back/lora.safetensors", LORA)
    with caplog.at_level("DEBUG", logger="models.loras"):
        assert get_lora("owner/repo/sub/lora.safetensors", cache, hf_token=HF_TOKEN).read_bytes() == LORA
    authorizations = [(seen.headers["Host"].split(":")[0], seen.headers.get("Authorization")) for seen in server.seen]
    assert authorizations == [
        ("127.0.0.1", f"Bearer {HF_TOKEN}"),
        ("127.0.0.1", f"Bearer {HF_TOKEN}"),
        ("localhost", None),
        ("127.0.0.1", None),  # dropped for good once a redirect left the origin
    ]
    assert HF_TOKEN not in caplog.text and "SIGNATURE_SECRET" not in caplog.text
    assert "redirected to http://localhost:" in caplog.text


def test_hugging_face_repo_listing(server, cache, private_ok, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url("/"))

    def listing(repo: str, names: list[str]) -> None:
        siblings = [{"rfilename": name} for name in names]
        server.file(f"/api/models/{repo}", json.dumps({"id": repo, "siblings": siblings}).encode())

    listing("owner/repo", ["README.md", ".gitattributes", "sub dir/pytorch_lora_weights.safetensors", "image.png"])
    server.file("/owner/repo/resolve/main/sub%20dir/pytorch_lora_weights.safetensors", LORA)
    assert get_lora("owner/repo", cache).read_bytes() == LORA
    assert [seen.path for seen in server.seen] == [
        "/api/models/owner/repo",
        "/owner/repo/resolve/main/sub%20dir/pytorch_lora_weights.safetensors",
    ]

    listing("owner/many", ["a.safetensors", "b/c.safetensors", "README.md"])
    refused(
        lambda: get_lora("owner/many", cache),
        "owner/many has 2 .safetensors files (a.safetensors, b/c.safetensors)",
        "give one as owner/many/path/file.safetensors",
    )
    listing("owner/none", ["README.md", "model.bin"])
    refused(lambda: get_lora("owner/none", cache), "owner/none has no .safetensors file")
    server.file("/api/models/owner/broken", b"<html>")
    refused(lambda: get_lora("owner/broken", cache), "unreadable file list")
    refused(lambda: get_lora("owner/gone", cache), "repo owner/gone was not found (404)")
    refused(lambda: get_lora("owner/repo/other.safetensors", cache), "owner/repo has no file other.safetensors (404)")


def test_hugging_face_gated_repo_asks_for_a_token(server, cache, private_ok, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url(""))
    server.file("/api/models/owner/gated", b'{"error": "Access restricted"}', status=401)
    server.file("/owner/gated/resolve/main/lora.safetensors", b'{"error": "gated"}', status=403)
    refused(lambda: get_lora("owner/gated", cache), "gated, private or missing (401); give hf_api_token")
    message = refused(
        lambda: get_lora("owner/gated/lora.safetensors", cache, hf_token=HF_TOKEN),
        "hf_api_token does not give access to the Hugging Face repo owner/gated (403)",
        f"accept its terms at {server.url('/owner/gated')}",
    )
    assert HF_TOKEN not in message


@pytest.mark.parametrize(
    ("status", "fragment"),
    [
        (404, "not found (404) at http://127.0.0.1:"),
        (403, "answered 403 Forbidden: the URL needs credentials; use a signed or public URL"),
        (401, "answered 401 Unauthorized: the URL needs credentials"),
        (500, "answered HTTP 500 Internal Server Error; try again later"),
        (410, "answered HTTP 410 Gone; check the URL"),
    ],
)
def test_http_errors(server, cache, private_ok, status, fragment):
    url = server.file("/lora.safetensors", b"nope", status=status)
    message = refused(lambda: get_lora(url + "?signature=SIGNED", cache), fragment)
    assert "SIGNED" not in message
    assert not cache_files(cache)


def test_content_served_with_200_is_checked(server, cache, private_ok):
    html = server.file("/page", b"<!DOCTYPE html><html>Log in</html>", headers={"Content-Type": "text/html"})
    refused(lambda: get_lora(html, cache), NOT_A_LORA)
    checkpoint = server.file("/model.safetensors", pickle.dumps({"a": 1}, protocol=2))
    refused(lambda: get_lora(checkpoint, cache), PICKLE_REFUSAL)
    assert not cache_files(cache)


def test_loopback_is_refused_unless_allowed(server, cache):
    url = server.file("/lora.safetensors", LORA)
    refused(lambda: get_lora(url, cache), "127.0.0.1 resolves to 127.0.0.1, which is not a public address")
    refused(lambda: get_lora(server.url("/lora.safetensors", host="localhost"), cache), "not a public address")
    assert server.seen == []


def test_connects_to_the_checked_address_with_the_url_s_host(server, cache, private_ok, dns):
    dns.addresses["lora.example.test"] = ["127.0.0.1"]
    server.file("/lora.safetensors", LORA)
    assert get_lora(server.url("/lora.safetensors", host="lora.example.test"), cache).read_bytes() == LORA
    assert server.seen[0].headers["Host"] == f"lora.example.test:{server.port}"
    assert dns.lookups == ["lora.example.test"]


def test_every_redirect_hop_is_checked(server, cache, dns, monkeypatch):
    # Pretend the loopback server is public, so the test can see the second hop refused.
    monkeypatch.setattr(http_client, "is_public_address", lambda address: address == "127.0.0.1")
    dns.addresses["internal.example.test"] = ["10.0.0.7"]
    url = server.redirect("/lora.safetensors", f"http://internal.example.test:{server.port}/lora.safetensors")
    refused(lambda: get_lora(url, cache), "internal.example.test resolves to 10.0.0.7, which is not a public address")
    assert len(server.seen) == 1


def test_unreachable_and_unknown_hosts(cache, private_ok, dns):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    refused(lambda: get_lora(f"http://127.0.0.1:{port}/lora.safetensors", cache), "cannot connect to 127.0.0.1")
    dns.addresses["nowhere.example.test"] = []
    refused(lambda: get_lora("https://nowhere.example.test/x", cache), "cannot resolve the host nowhere.example.test")


def test_slow_server_times_out(server, cache, private_ok, monkeypatch):
    monkeypatch.setattr(http_client, "READ_TIMEOUT_S", 0.2)

    def slow_headers(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(1)
        send(handler, 200, LORA)

    def slow_body(handler: BaseHTTPRequestHandler) -> None:
        send(handler, 200, LORA[:50], headers={"Content-Length": str(len(LORA))}, length=False)
        handler.wfile.flush()
        time.sleep(1)

    server.routes["/slow.safetensors"] = slow_headers
    server.routes["/stalls.safetensors"] = slow_body
    started = time.monotonic()
    refused(
        lambda: get_lora(server.url("/slow.safetensors"), cache),
        f"timed out fetching {server.url('/slow.safetensors')} after 0.2 s; try again or use another host",
    )
    refused(lambda: get_lora(server.url("/stalls.safetensors"), cache), "timed out fetching", "after 0.2 s")
    assert time.monotonic() - started < 1.5
    assert not cache_files(cache)


def test_a_download_that_trickles_is_stopped_at_its_deadline(server, cache, private_ok, monkeypatch):
    """Every byte arrives within the idle timeout, yet the download as a whole is bounded ($LORA_DOWNLOAD_TIMEOUT)."""
    monkeypatch.setenv("LORA_DOWNLOAD_TIMEOUT", "1")

    def trickle(handler: BaseHTTPRequestHandler) -> None:
        send(handler, 200, b"", headers={"Content-Length": str(len(LORA))}, length=False)
        for byte in LORA:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.05)

    server.routes["/trickle.safetensors"] = trickle
    started = time.monotonic()
    refused(
        lambda: get_lora(server.url("/trickle.safetensors"), cache),
        f"fetching {server.url('/trickle.safetensors')} took longer than 1 s (LORA_DOWNLOAD_TIMEOUT)",
    )
    assert time.monotonic() - started < 2.0
    assert not cache_files(cache)


def test_the_download_deadline_must_be_a_positive_number_of_seconds(server, cache, private_ok, monkeypatch):
    monkeypatch.setenv("LORA_DOWNLOAD_TIMEOUT", "soon")
    server.file("/lora.safetensors", LORA)
    expected = r"^LORA_DOWNLOAD_TIMEOUT: must be a positive number of seconds, got 'soon'$"
    with pytest.raises(SettingError, match=expected):
        get_lora(server.url("/lora.safetensors"), cache)


def test_size_cap_from_content_length_and_while_streaming(server, cache, private_ok, monkeypatch):
    monkeypatch.setattr(limits, "MAX_LORA_BYTES", 1000)
    big = lora_bytes() + b"\0" * 2000
    server.file("/big.safetensors", big)
    refused(lambda: get_lora(server.url("/big.safetensors"), cache), "the file is 2.", "more than the 1000 bytes limit")
    server.routes["/unsized.safetensors"] = lambda handler: send(handler, 200, big, length=False)
    refused(lambda: get_lora(server.url("/unsized.safetensors"), cache), "larger than the 1000 bytes limit")
    assert not cache_files(cache)


def test_interrupted_download_leaves_no_entry(server, cache, private_ok):
    server.routes["/cut.safetensors"] = lambda handler: send(
        handler, 200, LORA[:100], headers={"Content-Length": str(len(LORA))}, length=False
    )
    refused(lambda: get_lora(server.url("/cut.safetensors"), cache), "was cut off after 100 bytes of", "try again")
    assert not cache_files(cache)


# Civitai over TLS, with a throwaway certificate for civitai.com


@pytest.fixture(scope="module")
def civitai_certificate(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"), "-days", "2",
         "-subj", "/CN=civitai.com", "-addext", "subjectAltName=DNS:civitai.com"],
        check=True, capture_output=True,
    )  # fmt: skip
    return folder


@pytest.fixture
def civitai(civitai_certificate, dns, private_ok, monkeypatch):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(civitai_certificate / "cert.pem", civitai_certificate / "key.pem")
    tls_server = LoraServer(tls=context)
    dns.addresses["civitai.com"] = ["127.0.0.1"]
    dns.addresses["lora.example.test"] = ["127.0.0.1"]
    client = ssl.create_default_context(cafile=civitai_certificate / "cert.pem")
    monkeypatch.setattr(http_client, "tls_context", lambda: client)
    yield tls_server
    tls_server.close()


def test_civitai_token_goes_to_civitai_only(civitai, server, cache, caplog):
    signed = server.file("/signed/file", LORA) + "?X-Amz-Signature=SIGNATURE_SECRET"
    civitai.redirect("/api/download/models/12345", signed, status=307)
    url = civitai.url("/api/download/models/12345?type=Model&format=SafeTensor", host="civitai.com")
    with caplog.at_level("DEBUG", logger="models.loras"):
        assert get_lora(url, cache, civitai_token=CIVITAI_TOKEN, hf_token=HF_TOKEN).read_bytes() == LORA
    assert civitai.seen[0].headers["Host"] == f"civitai.com:{civitai.port}"
    assert civitai.seen[0].headers["Authorization"] == f"Bearer {CIVITAI_TOKEN}"
    assert "Authorization" not in server.seen[0].headers
    assert CIVITAI_TOKEN not in caplog.text and "SIGNATURE_SECRET" not in caplog.text


def test_civitai_refusals_name_the_token_input(civitai, cache):
    civitai.file("/api/download/models/7", b'{"error": "Unauthorized"}', status=401)
    url = civitai.url("/api/download/models/7", host="civitai.com")
    refused(lambda: get_lora(url, cache), "needs a Civitai API key (401); give civitai_api_token")
    message = refused(lambda: get_lora(url, cache, civitai_token=CIVITAI_TOKEN), "refused civitai_api_token (401)")
    assert CIVITAI_TOKEN not in message


def test_tls_certificate_is_checked_against_the_url_s_host(civitai, cache):
    civitai.file("/lora.safetensors", LORA)
    refused(
        lambda: get_lora(civitai.url("/lora.safetensors", host="lora.example.test"), cache),
        "the TLS certificate of lora.example.test is not valid",
    )
    assert civitai.seen == []


# The cache


def test_cache_folder_and_limits_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_CACHE", str(tmp_path / "model-cache"))
    default = LoraCache()
    assert default.folder == tmp_path / "model-cache.loras"
    assert (default.max_bytes, default.min_free_bytes) == (20 * 1024**3, 10 * 1024**3)
    assert not default.folder.exists()  # made on first use
    monkeypatch.setenv("LORA_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("LORA_CACHE_MAX_BYTES", "123")
    monkeypatch.setenv("LORA_CACHE_MIN_FREE_BYTES", "45")
    configured = LoraCache()
    assert (configured.folder, configured.max_bytes, configured.min_free_bytes) == (tmp_path / "elsewhere", 123, 45)
    monkeypatch.setenv("LORA_CACHE_MAX_BYTES", "20G")
    with pytest.raises(ValueError, match=r"^LORA_CACHE_MAX_BYTES: must be a whole number of bytes"):
        LoraCache()


def test_least_recently_used_entries_are_evicted_first(cache, caplog):
    sources = [data_uri(lora_bytes(seed)) for seed in range(4)]
    size = len(lora_bytes(0))
    cache.max_bytes = int(2.5 * size)
    first, second = get_lora(sources[0], cache), get_lora(sources[1], cache)
    os.utime(first, (1000, 1000))
    os.utime(second, (2000, 2000))
    assert get_lora(sources[0], cache) == first  # a hit: now the most recently used
    with caplog.at_level("INFO", logger="models.loras"):
        third = get_lora(sources[2], cache)
    assert not second.exists() and not second.with_suffix(".json").exists()
    assert first.exists() and third.exists()
    assert f"evicted {second.name}" in caplog.text

    os.utime(first, (1000, 1000))
    os.utime(third, (2000, 2000))
    fourth = get_lora(sources[3], cache, in_use=[first])  # first is the oldest but in use
    assert first.exists() and fourth.exists() and not third.exists()


def test_free_space_floor_evicts_all_but_the_new_entry_and_warns(cache, monkeypatch, caplog):
    older = [get_lora(data_uri(lora_bytes(seed)), cache) for seed in range(3)]
    cache.min_free_bytes = 1 << 30
    monkeypatch.setattr(cache, "free_bytes", lambda: 0)
    with caplog.at_level("WARNING", logger="models.loras"):
        newest = get_lora(data_uri(lora_bytes(9)), cache)
    assert newest.exists() and not any(path.exists() for path in older)
    assert "kept the entries in use" in caplog.text


def test_stale_temporary_files_are_removed(cache):
    cache.folder.mkdir(parents=True)
    stale, fresh = cache.folder / "crashed.tmp", cache.folder / "in-progress.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200,) * 2)
    (cache.folder / f"{'0' * 64}.json").write_text("{}")  # a note whose entry is gone
    entry = get_lora(data_uri(LORA), cache)
    assert cache_files(cache) == sorted([fresh.name, entry.name, entry.with_suffix(".json").name])


def test_damaged_cache_entry_is_fetched_again(cache, caplog):
    source = data_uri(LORA)
    entry = get_lora(source, cache)
    entry.write_bytes(LORA[:-10])
    with caplog.at_level("WARNING", logger="models.loras"):
        assert get_lora(source, cache).read_bytes() == LORA
    assert "removing damaged entry" in caplog.text
