"""A client of Cog's real HTTP server (coglet) serving predict.py, as Replicate's container runs it: start it, send
predictions, read their results; and small HTTP servers for files and webhooks."""

import base64
import functools
import http.server
import io
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    """A Cog server process and the URL it answers on."""

    url: str
    process: subprocess.Popen
    log_path: Path
    status: str = "READY"

    def worker_pid(self) -> int:
        """The predictor's worker: coglet runs it as a child process of the server."""
        [pid] = child_pids(self.process.pid)
        return pid

    def worker_rss(self) -> int:
        """Resident memory of the worker process, in bytes."""
        return resident_bytes(self.worker_pid())


def child_pids(pid: int) -> list[int]:
    """Children of a process, whichever of its threads started them."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return sorted({int(child) for task in tasks for child in (task / "children").read_text().split()})


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


@contextmanager
def running_cog_server(
    model_cache: Path,
    log_path: Path,
    env: dict[str, str] | None = None,
    startup_timeout: float = 180.0,
    setup_may_fail: bool = False,
    train: bool = False,
):
    """Start `python -m cog.server.http` on a free loopback port; yield it once READY (or SETUP_FAILED, when
    setup_may_fail). train: serve train.py at /trainings, as Cog's image does in train mode (`--x-mode train`)."""
    port = free_port()
    server_env = {
        **os.environ,
        "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
        "COG_TRAIN_TYPE_STUB": "train.py:train",
        "PORT": str(port),
        "MODEL_CACHE": str(model_cache),
        "HF_HUB_OFFLINE": "1",
        # coglet starts its worker with `python` from PATH: make that this interpreter.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **(env or {}),
    }
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1", *(["--x-mode", "train"] if train else [])],
            cwd=ROOT,
            env=server_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_timeout
            settled = ("READY", "SETUP_FAILED") if setup_may_fail else ("READY",)
            while (status := health(url)) not in settled:
                if server.poll() is not None or time.monotonic() > deadline or status == "SETUP_FAILED":
                    raise RuntimeError(f"Cog server did not become ready; see {log_path}")
                time.sleep(0.5)
            yield RunningServer(url, server, log_path, status)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


@contextmanager
def cog_server(model_cache: Path, log_path: Path, startup_timeout: float = 180.0):
    """Start a Cog server; yield its base URL once READY."""
    with running_cog_server(model_cache, log_path, startup_timeout=startup_timeout) as server:
        yield server.url


def health(url: str) -> str | None:
    try:
        return requests.get(f"{url}/health-check", timeout=5).json()["status"]
    except (requests.RequestException, ValueError, KeyError):
        return None


def wait_until_ready(url: str, timeout: float = 15.0) -> bool:
    """True once the server reports READY: it says BUSY for a moment after answering a request."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health(url) == "READY":
            return True
        time.sleep(0.1)
    return False


def data_uri(content: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(content).decode()}"


def decode_output(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def predict(url: str, inputs: dict, timeout: float = 300.0, endpoint: str = "predictions", **headers) -> dict:
    """One synchronous prediction's (or, with endpoint="trainings", training's) answer, its JSON, retried once on HTTP
    409: Cog 0.23.1 can answer 409 for a few milliseconds after a prediction ends, before it has freed the slot, and
    asks clients to retry."""
    for attempt in range(2):
        response = requests.post(f"{url}/{endpoint}", json={"input": inputs}, headers=headers, timeout=timeout)
        if response.status_code != 409 or attempt:
            break
        time.sleep(0.1)
    return response.json()


def predict_async(url: str, inputs: dict, webhook: str, endpoint: str = "predictions") -> str:
    """Start a prediction (or training) that answers at once (`Prefer: respond-async`); its result goes to the
    webhook."""
    response = requests.post(
        f"{url}/{endpoint}",
        json={"input": inputs, "webhook": webhook},
        headers={"Prefer": "respond-async"},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()["id"]


def cancel(url: str, prediction_id: str, endpoint: str = "predictions") -> None:
    requests.post(f"{url}/{endpoint}/{prediction_id}/cancel", timeout=30).raise_for_status()


class WebhookReceiver:
    """Collects the prediction updates Cog posts to a webhook (coglet 0.23 has no GET /predictions/{id})."""

    TERMINAL = ("succeeded", "failed", "canceled")

    def __init__(self, url: str):
        self.url = url
        self.updates: queue.Queue[dict] = queue.Queue()

    def final(self, prediction_id: str, timeout: float = 300.0) -> dict:
        """The prediction's last update, once it has succeeded, failed or been cancelled."""
        deadline = time.monotonic() + timeout
        while True:
            update = self.updates.get(timeout=max(0.0, deadline - time.monotonic()))
            if update.get("id") == prediction_id and update.get("status") in self.TERMINAL:
                return update


@contextmanager
def serving_in_thread(handler: Callable[..., http.server.BaseHTTPRequestHandler]):
    """Run an HTTP server on a free loopback port in a background thread; yield its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        """Quiet: pytest shows failures, not every request."""


@contextmanager
def webhook_receiver():
    """Records every JSON body Cog posts to the yielded receiver's URL."""

    class Handler(QuietHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            receiver.updates.put(json.loads(body))
            self.send_response(200)
            self.end_headers()

    with serving_in_thread(Handler) as url:
        receiver = WebhookReceiver(f"{url}/webhook")
        yield receiver


@contextmanager
def file_server(folder: Path):
    """Serve a folder's files over HTTP, as Replicate hands files to a model: as URLs that Cog downloads."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    with serving_in_thread(handler) as url:
        yield url
