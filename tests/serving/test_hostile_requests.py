"""Hostile requests through Cog's HTTP server: hostile LoRA files, an edit whose numbers overflow, broken pictures, and
a cancel while a LoRA trickles in. Each is answered in one line naming the input (or what to try), nothing broken is
returned, and the server is READY after each."""

import io
import struct
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from models.pipeline import NON_FINITE
from models.tooling.cog_server import (
    QuietHandler,
    cancel,
    data_uri,
    decode_output,
    health,
    predict,
    predict_async,
    running_cog_server,
    serving_in_thread,
    wait_until_ready,
    webhook_receiver,
)
from models.tooling.pictures import photo, png_bytes
from tests.support.hostile import hostile_files

pytestmark = pytest.mark.server

WIDTH, HEIGHT = 64, 48
PICTURE = photo(WIDTH, HEIGHT, seed=3)
REFUSED_WITHIN_S = 10.0
"""A hostile file is refused within this, fetch and Cog's own handling included."""


def half_map() -> bytes:
    change_map = np.zeros((HEIGHT, WIDTH), np.uint8)
    change_map[:, WIDTH // 2 :] = 255
    return png_bytes(change_map)


BASE = {"image": data_uri(png_bytes(PICTURE)), "map": data_uri(half_map()), "seed": 5, "output_format": "png"}


def overflowing_lora(tiny_models) -> bytes:
    """Finite, merged within float32, yet the UNet's first convolution then overflows: NaN by the VAE decode."""
    conv = tiny_models["unet"].conv_in
    out_channels, in_channels = conv.weight.shape[:2]
    return save({
        "lora_unet_conv_in.lora_down.weight": torch.full((1, in_channels, 3, 3), 1e15),
        "lora_unet_conv_in.lora_up.weight": torch.full((out_channels, 1, 1, 1), 1e15),
        "lora_unet_conv_in.alpha": torch.tensor(1e6),
    })  # fmt: skip


def tiff_pages(broken_page: int) -> bytes:
    """A two-page TIFF whose page `broken_page` has lost its size tags (Pillow: TypeError "Missing dimensions")."""
    buffer = io.BytesIO()
    Image.fromarray(PICTURE).save(buffer, "TIFF", save_all=True, append_images=[Image.fromarray(PICTURE)])
    data = bytearray(buffer.getvalue())
    order = "<" if data[:2] == b"II" else ">"
    offset = struct.unpack_from(order + "I", data, 4)[0]
    for _ in range(broken_page):
        count = struct.unpack_from(order + "H", data, offset)[0]
        offset = struct.unpack_from(order + "I", data, offset + 2 + 12 * count)[0]
    count = struct.unpack_from(order + "H", data, offset)[0]
    for index in range(count):
        entry = offset + 2 + 12 * index
        if struct.unpack_from(order + "H", data, entry)[0] in (256, 257):  # ImageWidth, ImageLength
            struct.pack_into(order + "H", data, entry, 65000)
    return bytes(data)


class Files:
    """A loopback server of named bodies; "/trickle" sends a LoRA a byte at a time, for ever slower."""

    def __init__(self):
        self.bodies: dict[str, bytes] = {}
        self.trickling = threading.Event()

    def handler(self):
        files = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                body = files.bodies.get(self.path.lstrip("/"), b"")
                self.send_response(200 if body else 404)
                self.send_header("Content-Length", str(len(body) or 0))
                self.end_headers()
                if self.path == "/trickle.safetensors":
                    files.trickling.set()
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.5)
                else:
                    self.wfile.write(body)

        return Handler


@pytest.fixture(scope="module")
def hostile(tiny_models) -> dict[str, tuple[bytes, str]]:
    return hostile_files(tiny_models)


@pytest.fixture(scope="module")
def files(tiny_models, hostile):
    hosted = Files()
    hosted.bodies = {f"{name}.safetensors": content for name, (content, _) in hostile.items()}
    hosted.bodies["overflow.safetensors"] = overflowing_lora(tiny_models)
    hosted.bodies["trickle.safetensors"] = hosted.bodies["overflow.safetensors"]
    with serving_in_thread(hosted.handler()) as url:
        hosted.url = url
        yield hosted


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile-server")
    env = {"ALLOW_PRIVATE_LORA_HOSTS": "1", "LORA_CACHE": str(folder / "loras")}
    with running_cog_server(tiny_weights, folder / "server.log", env=env) as running:
        yield running


def ask(server, changes: dict) -> dict:
    assert wait_until_ready(server.url)
    return predict(server.url, {**BASE, **changes})


def assert_refused_in_one_line(result: dict, prefix: str, fragment: str) -> None:
    assert result["status"] == "failed" and not result.get("output"), result
    error = result["error"]  # Cog puts "Prediction failed: ..." and the exception's class before the message
    assert prefix in error and fragment in error, error
    assert "\n" not in error.strip() and "Traceback" not in error, error


@pytest.mark.parametrize(
    "name",
    ["redos-alpha-pattern", "nan-tensor", "empty-alpha-tensor", "huge-alpha-integer", "deeply-nested-metadata",
     "alpha-a-string", "huge-offsets", "16-mib-header"],
)  # fmt: skip
def test_a_hostile_lora_is_refused_in_one_line_and_the_server_stays_ready(server, files, hostile, name):
    _, expected = hostile[name]
    started = time.monotonic()
    result = ask(server, {"lora_weights": f"{files.url}/{name}.safetensors"})
    assert time.monotonic() - started < REFUSED_WITHIN_S
    assert_refused_in_one_line(result, "lora_weights: ", expected)
    assert wait_until_ready(server.url) and health(server.url) == "READY"


def test_an_edit_that_overflows_returns_nothing_and_says_what_to_try(server, files):
    result = ask(server, {"lora_weights": f"{files.url}/overflow.safetensors"})
    assert_refused_in_one_line(result, "the edit produced NaN or infinite values", "try a lower lora_scale")
    assert result["error"].endswith(NON_FINITE)
    assert wait_until_ready(server.url)
    [output] = ask(server, {})["output"]  # the LoRA is gone with the failed request: kept pixels are the input's
    assert np.array_equal(np.asarray(decode_output(output).convert("RGB"))[:, :24], PICTURE[:, :24])


def test_a_tiff_whose_second_page_has_no_size_is_edited_from_its_first(server):
    result = ask(server, {"image": data_uri(tiff_pages(broken_page=1), "image/tiff")})
    assert result["status"] == "succeeded", result.get("error")
    assert "image: animated or multi-page file, using its first frame" in result["logs"]


def test_a_tiff_whose_only_size_is_missing_is_refused_naming_the_input(server):
    for name in ("image", "map"):
        result = ask(server, {name: data_uri(tiff_pages(broken_page=0), "image/tiff")})
        assert_refused_in_one_line(result, f"{name}: ", "not a readable picture")
    assert wait_until_ready(server.url)


def test_a_cancel_while_a_lora_trickles_in_returns_the_server_to_ready(server, files):
    files.trickling.clear()
    with webhook_receiver() as webhook:
        prediction = predict_async(
            server.url, {**BASE, "lora_weights": f"{files.url}/trickle.safetensors"}, webhook.url
        )
        assert files.trickling.wait(30), "the download never started"
        cancelled_at = time.monotonic()
        cancel(server.url, prediction)
        final = webhook.final(prediction, timeout=30)
    assert final["status"] == "canceled"
    assert wait_until_ready(server.url, timeout=5) and time.monotonic() - cancelled_at < 5
    assert ask(server, {})["status"] == "succeeded"
