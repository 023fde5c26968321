"""Serving predict.py through Cog's real HTTP server (coglet), as Replicate's container does."""

import base64
import io
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def cog_server(model_cache: Path, log_path: Path, startup_timeout: float = 180.0):
    """Start `python -m cog.server.http` on a free loopback port; yield its base URL once READY."""
    port = free_port()
    env = {
        **os.environ,
        "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
        "PORT": str(port),
        "MODEL_CACHE": str(model_cache),
        "HF_HUB_OFFLINE": "1",
        # coglet starts its worker with `python` from PATH: make that this interpreter.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_timeout
            while health(url) != "READY":
                if server.poll() is not None or time.monotonic() > deadline or health(url) == "SETUP_FAILED":
                    raise RuntimeError(f"Cog server did not become ready; see {log_path}")
                time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


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


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def decode_output(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def predict(url: str, inputs: dict, timeout: float = 300.0, **headers) -> dict:
    response = requests.post(f"{url}/predictions", json={"input": inputs}, headers=headers, timeout=timeout)
    return response.json()
